//! `keygate keys …`: a client of the admin API.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct KeysArgs {}

pub fn run(_args: KeysArgs) -> ExitCode {
    ExitCode::from(1)
}
