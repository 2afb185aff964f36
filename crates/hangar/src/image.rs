//! `hangar image`: pull, push, build, ls, inspect, rm, gc, unpack, save, load.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hangar_oci::auth::Credentials;
use hangar_oci::build::BuildOptions;
use hangar_oci::client::{ClientOptions, PullOptions, PushOptions};
use hangar_oci::{Image, Platform, Reference, Store};
use serde_json::json;

use crate::progress;

#[derive(Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Args, Clone, Default)]
struct RegistryFlags {
    /// Registry credentials as user:password (default: ~/.docker/config.json)
    #[arg(long, value_name = "USER:PASS")]
    creds: Option<String>,
    /// Allow plain HTTP to a registry that is not on localhost
    #[arg(long)]
    insecure: bool,
}

impl RegistryFlags {
    fn options(&self) -> Result<ClientOptions> {
        let creds = match &self.creds {
            Some(c) => Some(Credentials::parse(c).context("--creds must be user:password")?),
            None => None,
        };
        Ok(ClientOptions {
            insecure: self.insecure,
            creds,
            ..Default::default()
        })
    }
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image from a registry into the local store
    Pull {
        /// Image reference, e.g. alpine:3.20 or localhost:5000/org/app:tag
        reference: String,
        /// Platform to select from a multi-platform image (default: this host's)
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Push a stored image to a registry (to DEST when given, else to REF)
    Push {
        reference: String,
        destination: Option<String>,
        /// Upload blobs larger than this many bytes in chunks of this size (0: never)
        #[arg(long, default_value_t = 32 << 20, value_name = "BYTES")]
        chunk_size: u64,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// List stored images
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show an image's digest, platform, size, run config and layers
    Inspect {
        reference: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove image names (their blobs go with the next `hangar image gc`)
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Delete blobs no image uses and print the bytes freed
    Gc,
    /// Unpack an image's layers into a new directory
    Unpack { reference: String, dir: PathBuf },
    /// Build an image from a directory: one new layer on an optional base
    Build {
        dir: PathBuf,
        /// Name of the new image
        #[arg(short = 't', long = "tag")]
        tag: String,
        /// Base image (pulled if not in the store)
        #[arg(long)]
        base: Option<String>,
        /// Entrypoint, as a JSON array or words separated by spaces
        #[arg(long)]
        entrypoint: Option<String>,
        /// Default command, as a JSON array or words separated by spaces
        #[arg(long)]
        cmd: Option<String>,
        /// Environment variable KEY=VALUE (repeatable)
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Port to declare, PORT[/tcp|udp] (repeatable)
        #[arg(long, value_name = "PORT")]
        expose: Vec<String>,
        #[command(flatten)]
        registry: RegistryFlags,
    },
    /// Write an image as an OCI layout: a directory, or a tar when PATH ends in .tar
    Save {
        reference: String,
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
    },
    /// Read images from an OCI layout (directory or tar) into the store
    Load {
        path: PathBuf,
        /// Name for the image when the layout has none (or to rename it)
        #[arg(short = 't', long = "tag")]
        tag: Option<String>,
    },
}

fn parse_ref(s: &str) -> Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `["a","b"]`, or words split as a POSIX shell splits them (quotes and
/// backslashes, no expansion): `sh -c 'echo hi'` is three words.
fn parse_command(flag: &str, s: &str) -> Result<Vec<String>> {
    if s.trim_start().starts_with('[') {
        return serde_json::from_str(s)
            .with_context(|| format!("--{flag} {s:?} is not a JSON array of strings"));
    }
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => bail!("--{flag} {s:?}: unterminated single quote"),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => bail!("--{flag} {s:?}: unterminated double quote"),
                        },
                        Some(c) => w.push(c),
                        None => bail!("--{flag} {s:?}: unterminated double quote"),
                    }
                }
            }
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                w.extend(chars.next());
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn build_epoch() -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        _ => Ok(0),
    }
}

pub fn run(args: ImageArgs) -> Result<()> {
    let store = Store::open(&crate::home()?)?;
    match args.command {
        ImageCommand::Pull {
            reference,
            platform,
            registry,
        } => {
            let r = parse_ref(&reference)?;
            let opts = PullOptions {
                platform: platform
                    .as_deref()
                    .map(str::parse::<Platform>)
                    .transpose()?,
                client: registry.options()?,
            };
            let record = runtime()?
                .block_on(hangar_oci::client::pull(
                    &store,
                    &r,
                    &opts,
                    progress::for_stdout(),
                ))
                .with_context(|| format!("pull {r}"))?;
            println!("{} {}", record.reference, record.digest);
        }
        ImageCommand::Push {
            reference,
            destination,
            chunk_size,
            registry,
        } => {
            let src = parse_ref(&reference)?;
            let dest = match &destination {
                Some(d) => parse_ref(d)?,
                None => src.clone(),
            };
            let opts = PushOptions {
                client: registry.options()?,
                chunk_size,
            };
            let digest = runtime()?
                .block_on(hangar_oci::client::push(
                    &store,
                    &src,
                    &dest,
                    &opts,
                    progress::for_stdout(),
                ))
                .with_context(|| format!("push {dest}"))?;
            println!("{dest} {digest}");
        }
        ImageCommand::Ls { json } => {
            let mut rows = Vec::new();
            for record in store.list_images()? {
                let image = store.load(record.clone());
                rows.push((record, image.ok()));
            }
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(r, i)| {
                        json!({
                            "reference": r.reference,
                            "digest": r.digest.to_string(),
                            "platform": i.as_ref().map(|i| i.config.platform().to_string()),
                            "size": i.as_ref().map(Image::size),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<50} {:<14} {:<14} {:>10}",
                    "REFERENCE", "DIGEST", "PLATFORM", "SIZE"
                );
                for (r, i) in rows {
                    let (platform, size) = match &i {
                        Some(i) => (i.config.platform().to_string(), human(i.size())),
                        None => ("(damaged)".into(), "-".into()),
                    };
                    println!(
                        "{:<50} {:<14} {:<14} {:>10}",
                        r.reference,
                        r.digest.short(),
                        platform,
                        size
                    );
                }
            }
        }
        ImageCommand::Inspect { reference, json } => {
            let r = parse_ref(&reference)?;
            let image = store.image(&r)?;
            print_inspect(&image, json)?;
        }
        ImageCommand::Rm { references } => {
            for reference in references {
                let r = parse_ref(&reference)?;
                let record = store.remove_image(&r)?;
                println!("removed {} ({})", record.reference, record.digest);
            }
        }
        ImageCommand::Gc => {
            let stats = store.gc()?;
            let snapshots = hangar_machine::snapshot::gc(&crate::home()?, &store)?;
            if snapshots > 0 {
                println!("removed {snapshots} layer snapshots no machine or image uses");
            }
            println!(
                "removed {} blobs, freed {} ({} bytes)",
                stats.blobs,
                human(stats.bytes),
                stats.bytes
            );
        }
        ImageCommand::Unpack { reference, dir } => {
            let r = parse_ref(&reference)?;
            let image = store.image(&r)?;
            let report =
                hangar_oci::unpack::unpack_image(&store, &image, &dir).with_context(|| {
                    format!("unpack {} into {}", image.record.reference, dir.display())
                })?;
            for w in &report.warnings {
                eprintln!("hangar: warning: {w}");
            }
            println!(
                "unpacked {} ({} layers, {} entries) into {}",
                image.record.reference,
                report.layers,
                report.entries,
                dir.display()
            );
        }
        ImageCommand::Build {
            dir,
            tag,
            base,
            entrypoint,
            cmd,
            env,
            workdir,
            user,
            expose,
            registry,
        } => {
            let tag = parse_ref(&tag)?;
            for kv in &env {
                if !kv.contains('=') || kv.starts_with('=') {
                    bail!("--env {kv:?} must be KEY=VALUE");
                }
            }
            let base = base.as_deref().map(parse_ref).transpose()?;
            if let Some(b) = &base {
                if store.resolve(b).is_err() {
                    let opts = PullOptions {
                        platform: None,
                        client: registry.options()?,
                    };
                    runtime()?
                        .block_on(hangar_oci::client::pull(
                            &store,
                            b,
                            &opts,
                            progress::for_stdout(),
                        ))
                        .with_context(|| format!("pull base image {b}"))?;
                }
            }
            let opts = BuildOptions {
                base,
                entrypoint: entrypoint
                    .as_deref()
                    .map(|e| parse_command("entrypoint", e))
                    .transpose()?,
                cmd: cmd
                    .as_deref()
                    .map(|c| parse_command("cmd", c))
                    .transpose()?,
                env,
                workdir,
                user,
                expose,
                epoch: build_epoch()?,
            };
            let record = hangar_oci::build::build(&store, &dir, &tag, &opts)
                .with_context(|| format!("build {} from {}", tag, dir.display()))?;
            println!("{} {}", record.reference, record.digest);
        }
        ImageCommand::Save { reference, output } => {
            let r = parse_ref(&reference)?;
            hangar_oci::layout::save(&store, &r, &output)
                .with_context(|| format!("save {r} to {}", output.display()))?;
            println!("saved {r} to {}", output.display());
        }
        ImageCommand::Load { path, tag } => {
            let tag = tag.as_deref().map(parse_ref).transpose()?;
            let records = hangar_oci::layout::load(&store, &path, tag.as_ref())
                .with_context(|| format!("load {}", path.display()))?;
            for r in records {
                println!("{} {}", r.reference, r.digest);
            }
        }
    }
    Ok(())
}

fn print_inspect(image: &Image, as_json: bool) -> Result<()> {
    let run = image.config.config.clone().unwrap_or_default();
    let ports: Vec<String> = run
        .exposed_ports
        .clone()
        .unwrap_or_default()
        .into_keys()
        .collect();
    let layers: Vec<_> = image
        .manifest
        .layers
        .iter()
        .zip(image.config.rootfs.diff_ids.iter())
        .map(|(l, d)| json!({"digest": l.digest.to_string(), "size": l.size, "media_type": l.media_type, "diff_id": d.to_string()}))
        .collect();
    let value = json!({
        "reference": image.record.reference,
        "digest": image.record.digest.to_string(),
        "index": image.record.index.as_ref().map(|d| d.to_string()),
        "media_type": image.record.media_type,
        "platform": image.config.platform().to_string(),
        "size": image.size(),
        "created": image.config.created,
        "entrypoint": run.entrypoint,
        "cmd": run.cmd,
        "env": run.env.clone().unwrap_or_default(),
        "workdir": run.working_dir,
        "user": run.user,
        "exposed_ports": ports,
        "layers": layers,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let show = |v: &Option<Vec<String>>| {
        v.as_ref()
            .map(|v| serde_json::to_string(v).unwrap_or_default())
            .unwrap_or_else(|| "-".into())
    };
    println!("Reference:  {}", image.record.reference);
    println!("Digest:     {}", image.record.digest);
    if let Some(i) = &image.record.index {
        println!("Index:      {i}");
    }
    println!("Media type: {}", image.record.media_type);
    println!("Platform:   {}", image.config.platform());
    println!(
        "Size:       {} ({} bytes compressed)",
        human(image.size()),
        image.size()
    );
    println!(
        "Created:    {}",
        image.config.created.as_deref().unwrap_or("-")
    );
    println!("Entrypoint: {}", show(&run.entrypoint));
    println!("Cmd:        {}", show(&run.cmd));
    println!(
        "Workdir:    {}",
        run.working_dir
            .as_deref()
            .filter(|w| !w.is_empty())
            .unwrap_or("-")
    );
    println!(
        "User:       {}",
        run.user.as_deref().filter(|u| !u.is_empty()).unwrap_or("-")
    );
    println!(
        "Ports:      {}",
        if ports.is_empty() {
            "-".into()
        } else {
            ports.join(", ")
        }
    );
    println!("Env:");
    for e in run.env.unwrap_or_default() {
        println!("  {e}");
    }
    println!("Layers:");
    for l in &image.manifest.layers {
        println!("  {} {:>10}", l.digest, human(l.size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_command;

    #[test]
    fn splits_commands_like_a_shell() {
        let p = |s: &str| parse_command("cmd", s).unwrap();
        assert_eq!(
            p("/bin/sh -c 'echo hi there'"),
            ["/bin/sh", "-c", "echo hi there"]
        );
        assert_eq!(
            p(r#"a "b \"c\" d" e\ f ''"#),
            ["a", r#"b "c" d"#, "e f", ""]
        );
        assert_eq!(p(r#"["x", "y z"]"#), ["x", "y z"]);
        assert!(parse_command("cmd", "'open").is_err());
        assert!(parse_command("cmd", "[1,2]").is_err());
    }
}
