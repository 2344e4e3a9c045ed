//! The command line's own parts (the binary's, not the library's): argument structs, progress
//! bars, printing. `main.rs` parses and dispatches; the commands that have moved here live one per
//! file.

pub mod sample;

/// Prints `text` and a newline on standard output. A closed pipe (`roentgen inspect … | head`)
/// ends the program quietly with status 0, as other command-line tools do, instead of panicking.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}
