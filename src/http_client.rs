//! The one way keygate builds an HTTP client: the CLI's admin client, a
//! gateway's calls to its control plane (sync feed, quota seeds, usage uploads),
//! webhooks and the `http` usage sink.

use std::time::Duration;

/// A client that gives up connecting after `connect` and, when `total` is set,
/// on any request after `total`; requests may set their own total instead.
pub fn build(user_agent: &str, connect: Duration, total: Option<Duration>) -> reqwest::Result<reqwest::Client> {
    builder(user_agent, connect, total).build()
}

/// The settings of [`build`], for a caller that adds its own (a redirect policy).
pub fn builder(user_agent: &str, connect: Duration, total: Option<Duration>) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder().connect_timeout(connect).user_agent(user_agent);
    match total {
        Some(total) => builder.timeout(total),
        None => builder,
    }
}

/// How a gateway names itself to its control plane.
pub const GATEWAY_AGENT: &str = concat!("keygate/", env!("CARGO_PKG_VERSION"));
/// How long a gateway waits to connect to its control plane.
pub const CONTROL_PLANE_CONNECT: Duration = Duration::from_secs(3);
