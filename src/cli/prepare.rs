//! `roentgen prepare`: training and test manifests from MIMIC-CXR-JPG and the IU X-ray reports,
//! with the summary (Table 1's rows) printed as a table or JSON.

use anyhow::Result;
use clap::Subcommand;
use roentgen::tools::prepare::iu::{self, IuArgs};
use roentgen::tools::prepare::mimic::{self, MimicArgs};

#[derive(Subcommand, Debug)]
pub enum PrepareCommand {
    /// MIMIC-CXR-JPG (files/pXX/pSUBJECT/sSTUDY/*.jpg, the reports, the metadata/CheXpert/split CSVs)
    /// → the paper's training set (p10–p18 minus the official test studies), p19 hold-out, or the
    /// official test split.
    Mimic(MimicArgs),
    /// Indiana University chest X-ray collection (Open-I XML reports: a folder or the .tgz).
    IuXray(IuArgs),
}

pub fn run(cmd: PrepareCommand) -> Result<()> {
    let (done, json) = match cmd {
        PrepareCommand::Mimic(a) => {
            let json = a.json;
            (mimic::run(a)?, json)
        }
        PrepareCommand::IuXray(a) => {
            let json = a.json;
            (iu::run(a)?, json)
        }
    };
    // The summary names the filters by their settings (`$min_chars 7`): shown here as flags.
    let flags = |text: &str| roentgen::diag::render_references(text, super::flag_for);
    if json {
        println!("{}", flags(&serde_json::to_string(&done.summary)?));
    } else {
        print!("{}", flags(&done.summary.render()));
        println!("wrote {} ({} rows) and {}", done.manifest.display(), done.rows, done.summary_file.display());
    }
    Ok(())
}
