//! Sections of a free-text MIMIC-CXR report, and its IMPRESSION as the paper uses it.
//!
//! Real reports look like
//!
//! ```text
//!                                  FINAL REPORT
//!  EXAMINATION:  CHEST (PA AND LAT)
//!  INDICATION:  ___F with new onset ascites  // eval for infection
//!  FINDINGS:
//!  There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
//!  nodular opacities that most likely represent nipple shadows.
//!  IMPRESSION:
//!  No acute cardiopulmonary process.
//! ```
//!
//! but headers come in any case and spacing ("Impression:", "IMPRESSION :", "IMPRESSION:text on the
//! same line"), with synonyms ("CONCLUSION", "FINDINGS AND IMPRESSION") and misspellings, and the
//! impression may span lines or be a numbered list. The rules follow the section parser published with
//! MIMIC-CXR (MIT-LCP/mimic-cxr, `section_parser.py` and `create_section_files.py`):
//! - a section starts at a line whose text before the first ':' is a known section name (any case;
//!   the table below, with the official normalisations) or is written in capitals
//!   (`RECOMMENDATION(S):`, `NOTIFICATION:`, `WET READ:` ...), and runs to the next such line;
//! - when a report has several impression sections (an addendum), the last one is taken, as the
//!   official script does;
//! - the text is whitespace-normalised: line breaks and runs of spaces become one space, list numbers
//!   and de-identification blanks ("___") are kept.
//!
//! A report without an impression section yields `None`: the paper trains on impressions only, so such
//! studies are dropped (and counted), not replaced by the findings or the last paragraph.

/// Section names (lower case) and what they normalise to, after the official `normalize_section_names`.
const SECTION_NAMES: &[(&str, &str)] = &[
    ("impression", "impression"),
    ("impressions", "impression"),
    ("conclusion", "impression"),
    ("conclusions", "impression"),
    ("findings and impression", "impression"),
    ("findings/impression", "impression"),
    ("findings/ impression", "impression"),
    ("impression/findings", "impression"),
    ("impresson", "impression"),
    ("imprression", "impression"),
    ("imoression", "impression"),
    ("impressoin", "impression"),
    ("imprssion", "impression"),
    ("impresion", "impression"),
    ("imperssion", "impression"),
    ("mpression", "impression"),
    ("impession", "impression"),
    ("findings", "findings"),
    ("finding", "findings"),
    ("findins", "findings"),
    ("findindgs", "findings"),
    ("findgings", "findings"),
    ("findngs", "findings"),
    ("findnings", "findings"),
    ("finidngs", "findings"),
    ("reference findings", "findings"),
    ("chest, two views", "findings"),
    ("comparison", "comparison"),
    ("comparisons", "comparison"),
    ("comparision", "comparison"),
    ("comparsion", "comparison"),
    ("comparrison", "comparison"),
    ("comparisions", "comparison"),
    ("reference exam", "comparison"),
    ("comparison exam", "comparison"),
    ("comparison film", "comparison"),
    ("indication", "indication"),
    ("indications", "indication"),
    ("idication", "indication"),
    ("reason for examination", "indication"),
    ("reason for exam", "indication"),
    ("clinical indication", "indication"),
    ("examination", "examination"),
    ("exam", "examination"),
    ("type of examination", "examination"),
    ("technique", "technique"),
    ("history", "history"),
    ("clinical history", "history"),
    ("clinical information", "history"),
    ("patient history", "history"),
    ("pfi", "history"),
    ("notification", "notification"),
    ("recommendation(s)", "recommendations"),
    ("recommendations", "recommendations"),
    ("recommendation", "recommendations"),
    ("addendum", "addendum"),
    ("date", "date"),
    ("comment", "comment"),
    ("comments", "comment"),
    ("wet read", "wet read"),
    ("wetread", "wet read"),
    ("final report", "final report"),
];

fn known(name: &str) -> Option<&'static str> {
    SECTION_NAMES.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

/// If `line` opens a section, its normalised name and the text after the colon.
fn header(line: &str) -> Option<(String, &str)> {
    let t = line.trim();
    let (raw, rest) = match t.find(':') {
        Some(i) => (&t[..i], &t[i + 1..]),
        // A known name alone on its line ("IMPRESSION", "FINAL REPORT") opens a section too.
        None => (t, ""),
    };
    let name = raw.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    if name.is_empty() || name.len() > 40 {
        return None;
    }
    if let Some(k) = known(&name) {
        return Some((k.to_string(), rest));
    }
    // Unknown names open a section only when written in capitals before a colon, as the official
    // parser's `\n ([A-Z ()/,-]+):\s`.
    let capitals = raw.chars().all(|c| c.is_ascii_uppercase() || " ()/,-&".contains(c))
        && raw.chars().filter(|c| c.is_ascii_uppercase()).count() >= 2;
    (capitals && t.contains(':')).then_some((name, rest))
}

/// The report split into (normalised section name, whitespace-normalised text); text before the
/// first header is "preamble".
pub fn sections(report: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, Vec<&str>)> = vec![("preamble".to_string(), Vec::new())];
    for line in report.lines() {
        match header(line) {
            Some((name, rest)) => out.push((name, vec![rest])),
            None => out.last_mut().expect("preamble").1.push(line),
        }
    }
    out.into_iter().map(|(n, lines)| (n, super::normalize_ws(&lines.join("\n")))).collect()
}

/// The impression as the paper uses it: the last non-empty impression section, whitespace-normalised.
pub fn impression(report: &str) -> Option<String> {
    sections(report).into_iter().rev().find(|(n, t)| n == "impression" && !t.is_empty()).map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(header(" IMPRESSION: "), Some(("impression".into(), "")));
        assert_eq!(header("Impression :No acute process."), Some(("impression".into(), "No acute process.")));
        assert_eq!(header("  FINDINGS AND IMPRESSION:"), Some(("impression".into(), "")));
        assert_eq!(header("RECOMMENDATION(S):  Follow-up."), Some(("recommendations".into(), "  Follow-up.")));
        assert_eq!(header(" NOTE TO REFERRING: call"), Some(("note to referring".into(), " call")));
        assert_eq!(header(" Dr. ___ was paged at 10:30 a.m."), None);
        assert_eq!(header(" Lines and tubes: unchanged."), None);
        assert_eq!(header(" IMPRESSION"), Some(("impression".into(), "")));
        assert_eq!(header(" NO ACUTE PROCESS"), None);
    }
}
