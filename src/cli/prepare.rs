//! `roentgen prepare`: training and test manifests from MIMIC-CXR-JPG and the IU X-ray reports,
//! with the summary (Table 1's rows) printed as a table or JSON.

use anyhow::Result;
use clap::{Args, Subcommand};
use roentgen::tools::prepare::iu::{self, IuOptions, Section};
use roentgen::tools::prepare::mimic::{self, MimicOptions, Split};
use roentgen::tools::prepare::{TextFilter, TextOptions};
use std::path::PathBuf;

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
            let json = a.text.json;
            (mimic::run(a.options())?, json)
        }
        PrepareCommand::IuXray(a) => {
            let json = a.text.json;
            (iu::run(a.options())?, json)
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

#[derive(Args, Debug)]
pub struct MimicArgs {
    /// MIMIC-CXR-JPG root: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg and mimic-cxr-2.0.0-metadata.csv,
    /// -chexpert.csv, -split.csv (or .csv.gz).
    #[arg(long)]
    pub root: PathBuf,
    /// Where the reports are, as files/pXX/pSUBJECT/sSTUDY.txt (MIMIC-CXR's mimic-cxr-reports.zip
    /// unpacked). Default: --root.
    #[arg(long)]
    pub reports: Option<PathBuf>,
    /// The JSONL manifest to write.
    #[arg(long)]
    pub out: PathBuf,
    /// train, p19 or test. train: p10–p18 minus the official test split; p19: the hold-out group; test: the official test split.
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Subject groups, e.g. "p10" or "p10,p11" (default: p10–p18 for train, p19 for p19, all for test).
    #[arg(long)]
    pub groups: Option<String>,
    /// ViewPosition(s) to keep: PA, AP, LATERAL, a comma list, or all.
    #[arg(long, default_value = "PA")]
    pub views: String,
    /// Keep at most N studies labelled "No Finding" (seeded choice).
    #[arg(long)]
    pub cap_no_finding: Option<usize>,
    /// Keep a seeded random sample of N ≥ 1 images at the end (e.g. 5000 for the paper's p19 test set).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Seed of the No-Finding cap and the sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub text: TextArgs,
}

impl MimicArgs {
    fn options(self) -> MimicOptions {
        let text = self.text.options();
        let MimicArgs { root, reports, out, split, groups, views, cap_no_finding, sample, seed, .. } = self;
        MimicOptions { root, reports, out, split, groups, views, cap_no_finding, sample, seed, text }
    }
}

#[derive(Args, Debug)]
pub struct IuArgs {
    /// The Open-I XML reports: a folder (searched recursively for *.xml) or a .tgz/.tar.gz of them.
    #[arg(long)]
    pub reports: PathBuf,
    /// The JSONL manifest to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Folder of the images: rows point to <DIR>/<parentImage id>.<ext>. It need not exist yet
    /// (the manifest can be built before the images are downloaded).
    #[arg(long, default_value = "images")]
    pub images: PathBuf,
    /// Image file extension.
    #[arg(long, default_value = "png")]
    pub image_ext: String,
    /// Which report section becomes the prompt: impression or findings.
    #[arg(long, default_value = "impression")]
    pub section: Section,
    /// DICOM metadata CSV (.csv or .csv.gz) with columns imageid and "View Position", for --views.
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// View Position(s) to keep (PA, AP, LATERAL, LL, a comma list) or all; other than all needs --metadata.
    #[arg(long, default_value = "all")]
    pub views: String,
    #[command(flatten)]
    pub text: TextArgs,
}

impl IuArgs {
    fn options(self) -> IuOptions {
        let text = self.text.options();
        let IuArgs { reports, out, images, image_ext, section, metadata, views, .. } = self;
        IuOptions { reports, out, images, image_ext, section, metadata, views, text }
    }
}

/// The text rules and the summary, the same for every source.
#[derive(Args, Debug)]
pub struct TextArgs {
    /// Drop texts (impressions, or the chosen section) shorter than this many characters.
    #[arg(long, default_value_t = 7)]
    pub min_chars: usize,
    /// Drop texts over this many CLIP tokens (BOS/EOS included).
    #[arg(long, default_value_t = 77)]
    pub max_tokens: usize,
    /// CLIP tokenizer (a tokenizer or pipeline folder). Default: the Stable Diffusion v1 tokenizer
    /// built into roentgen (the files of weights/sd-v1-4-config/tokenizer).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where to write the summary JSON (default: <manifest stem>.summary.json beside the manifest).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// Print the summary as one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl TextArgs {
    fn options(&self) -> TextOptions {
        let filter = TextFilter { min_chars: self.min_chars, max_tokens: self.max_tokens };
        TextOptions { filter, tokenizer: self.tokenizer.clone(), summary: self.summary.clone() }
    }
}
