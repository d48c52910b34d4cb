//! `copilot-trainer model fetch REF`: resolve a model reference to a local file and print its path.
//! `hf:<owner>/<repo>/<file>` goes through hf-hub (its cache first, then a download); a path is checked as is.

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Resolve REF (`hf:<owner>/<repo>/<file>` or a path) to a local file, downloading from the Hub if needed;
    /// prints the file's path.
    Fetch {
        reference: String,
        /// Only look in the local Hugging Face cache.
        #[arg(long)]
        offline: bool,
    },
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Fetch { reference, offline } => {
            let path = copilot_core::engine::source::resolve(&reference, !offline)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
