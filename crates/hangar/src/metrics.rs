//! `hangar metrics`: PromQL over the metrics of the caller's org, through
//! the node's API (which confines every query to the org of the token).

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::client::connect;

#[derive(Subcommand)]
pub enum MetricsCommand {
    /// Evaluate a PromQL expression now (or at --time), one line per series
    Query {
        expr: String,
        /// Evaluation time (Unix seconds or RFC 3339; default: now)
        #[arg(long)]
        time: Option<String>,
        /// Print Prometheus's answer as it is
        #[arg(long)]
        json: bool,
    },
    /// The series a selector matches, one per line
    Series {
        #[arg(required = true)]
        selectors: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: MetricsCommand) -> Result<()> {
    let client = connect()?;
    let rt = crate::apps::runtime()?;
    match command {
        MetricsCommand::Query { expr, time, json } => {
            let mut params = vec![("query", expr.as_str())];
            if let Some(t) = &time {
                params.push(("time", t));
            }
            let answer = rt.block_on(client.metrics("query", &params))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            let data = &answer["data"];
            match data["resultType"].as_str() {
                Some("vector") => {
                    for s in data["result"].as_array().into_iter().flatten() {
                        println!(
                            "{} {}",
                            series_name(&s["metric"]),
                            s["value"][1].as_str().unwrap_or("")
                        );
                    }
                }
                Some("matrix") => {
                    for s in data["result"].as_array().into_iter().flatten() {
                        let values: Vec<&str> = s["values"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v[1].as_str())
                            .collect();
                        println!("{} {}", series_name(&s["metric"]), values.join(" "));
                    }
                }
                Some("scalar" | "string") => {
                    println!("{}", data["result"][1].as_str().unwrap_or(""))
                }
                _ => bail!("the node's Prometheus answered something unexpected: {answer}"),
            }
        }
        MetricsCommand::Series { selectors, json } => {
            let params: Vec<(&str, &str)> =
                selectors.iter().map(|s| ("match[]", s.as_str())).collect();
            let answer = rt.block_on(client.metrics("series", &params))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(());
            }
            for s in answer["data"].as_array().into_iter().flatten() {
                println!("{}", series_name(s));
            }
        }
    }
    Ok(())
}

/// `name{label="value",...}` of a series' labels.
fn series_name(metric: &serde_json::Value) -> String {
    let Some(labels) = metric.as_object() else {
        return "{}".into();
    };
    let name = labels
        .get("__name__")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let rest: Vec<String> = labels
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| {
            format!(
                "{k}={}",
                serde_json::to_string(v.as_str().unwrap_or("")).unwrap_or_default()
            )
        })
        .collect();
    format!("{name}{{{}}}", rest.join(","))
}
