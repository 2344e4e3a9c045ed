//! Warnings and notes from the library's long-running work (training, evaluation, the CUDA
//! backend's fallbacks). The library prints nothing itself: it hands each message to the handler
//! the application installed with [`set_handler`] — the command line prints them on stderr — and
//! drops them when there is none (a library user who wants them installs one: a server logs them,
//! a test collects them).
//!
//! Settings are named as the library's structs name them, never as a front end spells them: a
//! refused one is a [`SettingError`]; a message that refers to one writes `$field` (`pass $resume
//! to continue`), which a front end renders with [`render_references`] (the command line: as its
//! flags, `--resume`).

use std::sync::RwLock;

/// How a message is meant: the command line prefixes "warning: " and "note: ", and prints
/// progress as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something the user should look at (skipped images, a changed setting on resume).
    Warning,
    /// Something done on the user's behalf (a leftover removed, a library fallback taken).
    Note,
    /// Where long work stands ("resuming from …", feature counts).
    Progress,
}

type Handler = Box<dyn Fn(Level, &str) + Send + Sync>;
static HANDLER: RwLock<Option<Handler>> = RwLock::new(None);

/// Installs the handler every later message goes to (replacing any earlier one).
pub fn set_handler(handler: impl Fn(Level, &str) + Send + Sync + 'static) {
    *HANDLER.write().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(handler));
}

pub fn emit(level: Level, message: &str) {
    if let Some(h) = HANDLER.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        h(level, message);
    }
}

pub fn warn(message: impl AsRef<str>) {
    emit(Level::Warning, message.as_ref());
}

pub fn note(message: impl AsRef<str>) {
    emit(Level::Note, message.as_ref());
}

pub fn progress(message: impl AsRef<str>) {
    emit(Level::Progress, message.as_ref());
}

/// A progress bar over `len` things of kind `unit` ("images"), labelled `message`, on stderr
/// (hidden where stderr is not a terminal).
pub fn progress_bar(len: u64, unit: &str, message: impl Into<String>) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{{msg}} {{bar:40}} {{pos}}/{{len}} {unit} [{{elapsed_precise}} < {{eta_precise}}]");
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(message.into());
    bar
}

/// A field of a request or config (a `SampleRequest`, an `OptimOptions`) that the library refused,
/// named as the struct names it (`height`, `num_images_per_prompt`), never as a front end spells
/// it: the command line renders the fields as its flags (`--height`, `--num-images`), a server as
/// its JSON keys.
#[derive(Debug)]
pub struct SettingError {
    /// The fields at fault, each with the value given where the message shows it.
    pub fields: Vec<(&'static str, Option<String>)>,
    /// What is wrong with them. Other settings it refers to are written `$field` (`pass
    /// $overwrite to replace it`) and rendered like the fields.
    pub problem: String,
}

impl SettingError {
    /// One field and the value given.
    pub fn value(field: &'static str, value: impl std::fmt::Display, problem: impl Into<String>) -> anyhow::Error {
        SettingError { fields: vec![(field, Some(value.to_string()))], problem: problem.into() }.into()
    }

    /// Fields refused together, without their values.
    pub fn fields(fields: &[&'static str], problem: impl Into<String>) -> anyhow::Error {
        SettingError { fields: fields.iter().map(|&f| (f, None)).collect(), problem: problem.into() }.into()
    }

    /// The message with each field named by `name` (`field value / field value: problem`).
    pub fn render(&self, name: impl Fn(&str) -> String) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .map(|(f, v)| match v {
                Some(v) => format!("{} {v}", name(f)),
                None => name(f),
            })
            .collect();
        format!("{}: {}", fields.join(" / "), render_references(&self.problem, |f| Some(name(f))))
    }
}

/// `text` with every `$field` (lower case, digits, `_`) replaced by `name(field)`; a reference
/// `name` does not know (None) stays as written.
pub fn render_references(text: &str, name: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let len =
            after.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(after.len());
        match (len, name(&after[..len])) {
            (1.., Some(n)) => out.push_str(&n),
            _ => {
                out.push('$');
                out.push_str(&after[..len]);
            }
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

impl std::fmt::Display for SettingError {
    /// Fields as the library names them, in backquotes: `` `height` 15: … ``.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(|name| format!("`{name}`")))
    }
}

impl std::error::Error for SettingError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_setting_names_fields_and_renders_with_any_names() {
        let e = SettingError {
            fields: vec![("height", Some("15".into())), ("width", Some("16".into()))],
            problem: "both must be positive multiples of 8".into(),
        };
        assert_eq!(e.to_string(), "`height` 15 / `width` 16: both must be positive multiples of 8");
        assert_eq!(e.render(|f| format!("--{f}")), "--height 15 / --width 16: both must be positive multiples of 8");
        let e = SettingError::fields(&["guidance"], "must be a finite number").context("sampling");
        let s = e.chain().find_map(|c| c.downcast_ref::<SettingError>()).expect("the refusal survives context");
        assert_eq!(s.render(|f| f.to_uppercase()), "GUIDANCE: must be a finite number");
        let e = SettingError {
            fields: vec![("output", Some("run".into()))],
            problem: "exists; pass $overwrite, or $resume_from_1 ($ 5)".into(),
        };
        assert_eq!(e.render(|f| format!("--{f}")), "--output run: exists; pass --overwrite, or --resume_from_1 ($ 5)");
        let known = |f: &str| (f == "resume").then(|| "--resume".to_string());
        assert_eq!(render_references("$resume, not $HOME or $other", known), "--resume, not $HOME or $other");
    }
}
