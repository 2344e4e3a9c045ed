//! `roentgen phantom`: a folder of phantom radiographs, their manifest and a label summary.

use anyhow::Result;
use clap::Args;
use roentgen::tools::phantom::write::write_phantoms;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct PhantomArgs {
    /// Output folder: phantom-NNNNN.png, manifest.jsonl (for `roentgen train`) and summary.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
    /// Image side in pixels (square images; at least 32).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Seed: the same seed writes byte-identical files; image i depends only on (seed, i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PhantomArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let summary = write_phantoms(&a.out, a.count, a.size, a.seed)?;
    if a.json {
        println!("{}", summary.to_json());
    } else {
        print!("{}", summary.render_table());
        println!(
            "wrote {} images ({}×{}) and {} in {:.1} s",
            summary.images,
            a.size,
            a.size,
            a.out.join("manifest.jsonl").display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
