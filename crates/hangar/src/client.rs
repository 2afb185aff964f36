//! The CLI's connection to the node: [`hangar_api::client::Client`] with
//! the base URL and token of `$HANGAR_HOME/config.toml` (or an org token
//! from `$HANGAR_API_TOKEN`).

use anyhow::Result;
pub use hangar_api::client::Client;

use crate::node_config;

/// The node of `$HANGAR_HOME`, as the admin or as `$HANGAR_API_TOKEN`'s org.
pub fn connect() -> Result<Client> {
    let config = node_config::load(&crate::home()?)?;
    // An org token, when given, instead of the node's admin token.
    let token = std::env::var("HANGAR_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or(config.token);
    Ok(Client::new(&config.api, &token))
}
