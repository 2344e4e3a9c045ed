//! The `roentgen` command line: src/cli parses, calls the library and prints.

mod cli;

fn main() {
    cli::main()
}
