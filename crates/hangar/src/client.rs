//! The node's API as the CLI calls it: base URL and token from
//! `$HANGAR_HOME/config.toml`; errors carry the node's message.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::node_config;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new() -> Result<Client> {
        let config = node_config::load(&crate::home()?)?;
        Ok(Client {
            http: reqwest::Client::new(),
            base: config.api.trim_end_matches('/').to_string(),
            // An org token, when given, instead of the node's admin token.
            token: std::env::var("HANGAR_API_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .unwrap_or(config.token),
        })
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        req.send().await.with_context(|| {
            format!(
                "cannot reach the node at {}; is `hangar up` running?",
                self.base
            )
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if !status.is_success() {
            let msg = value["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{msg}");
        }
        Ok(value)
    }
}
