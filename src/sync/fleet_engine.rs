//! A gateway's fleet-limit exchanges with its control plane
//! (`fleet_limits: { engine: control_plane }`): the same operations as on Redis,
//! sent as one `POST /v1/sync/fleet` per exchange and applied by the control plane
//! to its store in one transaction.

use async_trait::async_trait;

use crate::http_client;
use crate::limit::fleet::{CountEngine, FleetAnswers, FleetError, FleetExchange, Op, EXCHANGE_TIMEOUT};

pub struct ControlPlaneEngine {
    client: reqwest::Client,
    url: String,
    token: String,
    shown: String,
}

impl ControlPlaneEngine {
    pub fn new(base_url: &str, token: &str) -> Result<Self, FleetError> {
        let client = http_client::build(http_client::GATEWAY_AGENT, EXCHANGE_TIMEOUT, Some(EXCHANGE_TIMEOUT))
            .map_err(|e| FleetError::Engine(e.to_string()))?;
        let base = base_url.trim_end_matches('/');
        Ok(ControlPlaneEngine {
            client,
            url: format!("{base}/v1/sync/fleet"),
            token: token.to_owned(),
            shown: format!("control_plane {base}"),
        })
    }
}

#[async_trait]
impl CountEngine for ControlPlaneEngine {
    async fn exchange(&mut self, ops: &[Op]) -> Result<Vec<Option<u64>>, FleetError> {
        let body = FleetExchange { ops: ops.to_vec() };
        let response = self.client.post(&self.url).bearer_auth(&self.token).json(&body).send().await.map_err(|e| {
            match e.is_timeout() {
                true => FleetError::Timeout(EXCHANGE_TIMEOUT),
                false => FleetError::Engine(e.to_string()),
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(FleetError::Engine(format!("the control plane answered {status}: {}", cut(&text))));
        }
        let answers: FleetAnswers = response.json().await.map_err(|e| FleetError::Engine(e.to_string()))?;
        if answers.answers.len() != ops.len() {
            return Err(FleetError::Answer { asked: ops.len(), answered: answers.answers.len() });
        }
        Ok(answers.answers)
    }

    fn name(&self) -> String {
        self.shown.clone()
    }
}

/// Enough of an error body for a log line.
fn cut(text: &str) -> &str {
    let end = text.char_indices().nth(200).map_or(text.len(), |(at, _)| at);
    &text[..end]
}
