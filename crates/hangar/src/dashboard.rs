//! `hangar dashboard` and `hangar alerts`: the app's dashboards on a page
//! the node serves (opened with a one-time ticket, so the token never
//! reaches the browser), and what fires now.

use anyhow::Result;

use crate::client::connect;

#[derive(clap::Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    app: crate::apps::AppFlag,
    /// One of the node's own dashboards instead (edge, egress, registry;
    /// the admin token's only)
    #[arg(long, value_name = "NAME", conflicts_with = "app")]
    node: Option<String>,
    /// Print the link only; do not start a browser
    #[arg(long)]
    print: bool,
}

pub fn dashboard(args: DashboardArgs) -> Result<()> {
    let app = if args.node.is_some() {
        None
    } else {
        Some(crate::apps::app_name(&args.app)?)
    };
    let client = connect()?;
    let answer = crate::apps::runtime()?.block_on(client.dashboard_ticket(
        &hangar_api::wire::TicketRequest {
            app,
            node: args.node,
        },
    ))?;
    let url = format!("{}{}", client.base().trim_end_matches('/'), answer.path);
    println!("{url}");
    println!("(the link works once, within two minutes; the page then keeps a 12-hour session)");
    if !args.print {
        // A browser if there is one; the link above either way.
        crate::apps::open_in_browser(&url);
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct AlertsArgs {
    #[command(flatten)]
    app: crate::apps::AppFlag,
}

pub fn alerts(args: AlertsArgs) -> Result<()> {
    let app = crate::apps::app_name(&args.app)?;
    let client = connect()?;
    let a = crate::apps::runtime()?.block_on(client.alerts(&app))?;
    if args.app.json {
        println!("{}", serde_json::to_string_pretty(&a)?);
        return Ok(());
    }
    if a.rules.is_empty() {
        println!("{app} has no alert rules ([[alerts.rules]] in hangar.toml)");
    } else {
        println!("rules: {}", a.rules.join(", "));
    }
    if a.firing.is_empty() {
        println!("no alerts firing");
    }
    for f in &a.firing {
        let labels: Vec<String> = f
            .labels
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "alertname" | "org" | "app"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "FIRING {} since {} {}{}",
            f.name,
            f.since,
            labels.join(" "),
            if f.summary.is_empty() {
                String::new()
            } else {
                format!(": {}", f.summary)
            }
        );
    }
    match (&a.webhook, &a.last_delivery) {
        (None, _) => println!("webhook: none (alerts.webhook in hangar.toml)"),
        (Some(url), None) => println!("webhook: {url} (nothing posted yet)"),
        (Some(url), Some(d)) => println!("webhook: {url}: last post {}", d.outcome),
    }
    Ok(())
}
