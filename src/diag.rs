//! Warnings and notes from the library's long-running work (training, evaluation, the CUDA
//! backend's fallbacks). The library prints nothing itself: it hands each message to the handler
//! the application installed with [`set_handler`] — the command line prints them on stderr — and
//! drops them when there is none (a library user who wants them installs one: a server logs them,
//! a test collects them).

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
