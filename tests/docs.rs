//! docs/cli.md is generated from the clap definitions; this test keeps it current.
//! Regenerate with `KILN_UPDATE_DOCS=1 cargo test --test docs`.

use clap::CommandFactory;
use kiln::cli::Cli;

fn render() -> String {
    let mut out = String::from(
        "# `kiln` command-line reference\n\n\
         Generated from the code by `KILN_UPDATE_DOCS=1 cargo test --test docs`; the test suite fails \
         when this file is out of date.\n\n\
         Exit codes: `0` success; `1` the operation failed (model cannot be loaded, backend not usable, \
         inference error); `2` the command line or its input is wrong (bad flag, missing file, \
         request that does not match the model).\n\n\
         Every flag with an `[env: …]` note can also be set through that environment variable.\n",
    );
    // Env values of the test's own environment must not leak into the reference.
    fn hide_env(c: clap::Command) -> clap::Command {
        c.mut_args(|a| a.hide_env_values(true)).mut_subcommands(hide_env)
    }
    let mut cmd = hide_env(Cli::command().term_width(100));
    cmd.build();
    let mut sections = vec![(String::from("kiln"), cmd.clone())];
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            sections.push((format!("kiln {}", sub.get_name()), sub.clone()));
        }
    }
    for (title, mut c) in sections {
        let help = c.render_long_help().to_string();
        out.push_str(&format!("\n## `{title}`\n\n```text\n{}\n```\n", help.trim_end()));
    }
    out
}

#[test]
fn cli_reference_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    let want = render();
    if std::env::var_os("KILN_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).expect("writing docs/cli.md");
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "docs/cli.md is out of date: run `KILN_UPDATE_DOCS=1 cargo test --test docs`");
}
