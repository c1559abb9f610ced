//! `attncache-server --config FILE`: every flag can also be set in a TOML file, with the
//! flag's long name as key (`hot_mib = 1024` or `hot-mib = 1024`, `attn_cache = "on"`).
//! Flags given on the command line override the file. An unknown key or a value that is not
//! a string, a number or a boolean is refused with a message naming it; the merged settings are then
//! checked like command-line flags (clap, then the cache's own validation at start).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;

use crate::server::cli::ServeArgs;

/// The path given with `--config`, if any.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// Turns a TOML file into command-line arguments.
pub fn file_args(path: &Path) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let command = ServeArgs::command();
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| !["config", "help", "version"].contains(&l.as_str()))
        .collect();
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) {
            anyhow::bail!(
                "unknown setting `{key}` in {}; known settings: {}",
                path.display(),
                known.join(", ")
            );
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "setting `{key}` in {} must be a string, a number or a boolean, got {}",
                path.display(),
                other.type_str()
            ),
        };
        args.push(OsString::from(format!("--{flag}")));
        args.push(OsString::from(value));
    }
    Ok(args)
}

/// `argv` with the `--config` file's settings put before the command-line flags, so that
/// the command line wins.
pub fn args_with_config(argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let mut out = Vec::with_capacity(argv.len() + 8);
    out.extend(argv.first().cloned());
    out.extend(file_args(&path)?);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(file: &str, cli: &[&str]) -> anyhow::Result<ServeArgs> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("server.toml");
        std::fs::write(&path, file)?;
        let mut argv: Vec<OsString> = vec!["attncache-server".into()];
        argv.extend(cli.iter().map(OsString::from));
        argv.push("--config".into());
        argv.push(path.into_os_string());
        Ok(ServeArgs::try_parse_from(args_with_config(argv)?)?)
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let a = parse(
            "hot_mib = 100\nattn-cache = \"on\"\nport = 9000\n",
            &["--port", "1234"],
        )
        .unwrap();
        assert_eq!(a.hot_mib, 100);
        assert_eq!(a.attn_cache, crate::server::cli::OnOff::On);
        assert_eq!(a.port, 1234);
        let t = parse("similarity_threshold = 0.05\n", &[]).unwrap();
        assert_eq!(t.similarity_threshold, Some(0.05));
    }

    #[test]
    fn unknown_and_malformed_settings_are_refused_by_name() {
        let e = parse("hot_mb = 100\n", &[]).unwrap_err().to_string();
        assert!(
            e.contains("unknown setting `hot_mb`") && e.contains("hot-mib"),
            "{e}"
        );
        let e = parse("hot_mib = [1, 2]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("`hot_mib`") && e.contains("array"), "{e}");
        let e = parse("hot_mib = 0\n", &[]).unwrap_err().to_string();
        assert!(e.contains("hot-mib") || e.contains("hot_mib"), "{e}");
        let e = parse("attn_cache = \"sometimes\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes"), "{e}");
        let e = parse("this is not toml", &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
