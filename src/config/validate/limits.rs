//! `plans`, `default_plan` and `fleet_limits`: the limits keys get.

use super::*;

impl Builder<'_> {
    pub(super) fn fleet_limits(
        &mut self,
        raw: Option<Parsed<RawFleetLimits>>,
        keys: Option<&KeysConfig>,
    ) -> Option<FleetLimitsConfig> {
        let raw = self.parsed(raw, "fleet_limits")?;
        let interval_text = raw.sync_interval;
        let sync_interval = self.duration(
            interval_text.clone(),
            "fleet_limits.sync_interval",
            super::super::DEFAULT_FLEET_SYNC_INTERVAL,
            false,
        );
        if interval_text.is_some()
            && !(super::super::MIN_FLEET_SYNC_INTERVAL..=super::super::MAX_FLEET_SYNC_INTERVAL).contains(&sync_interval)
        {
            self.issues.add(
                "fleet_limits.sync_interval",
                format!(
                    "must be from {} to {}",
                    format_duration(super::super::MIN_FLEET_SYNC_INTERVAL),
                    format_duration(super::super::MAX_FLEET_SYNC_INTERVAL)
                ),
            );
        }
        let engine = match raw.engine.as_ref().map(|Text(e)| e.trim()) {
            None => {
                self.issues.add("fleet_limits.engine", MISSING);
                return None;
            }
            Some("redis") => {
                let url = self.required(raw.url, "fleet_limits.url")?;
                if let Err(e) = redis::Client::open(url.as_str()) {
                    self.issues
                        .add("fleet_limits.url", format!("not a Redis URL (redis://host:port, unix:///path): {e}"));
                    return None;
                }
                FleetEngine::Redis { url }
            }
            Some("control_plane") => {
                if raw.url.is_some() {
                    self.issues.add("fleet_limits.url", "only for `redis`: `control_plane` uses keys.control_plane");
                }
                // Unknown when `keys` has its own errors, which are reported already.
                if keys.is_some_and(|keys| keys.control_plane.is_none()) {
                    self.issues.add(
                        "fleet_limits.engine",
                        "`control_plane` needs keys.control_plane (a gateway following a control plane)",
                    );
                    return None;
                }
                FleetEngine::ControlPlane
            }
            Some(other) => {
                self.issues.add(
                    "fleet_limits.engine",
                    format!("unknown engine {other:?}, expected `redis` or `control_plane`"),
                );
                return None;
            }
        };
        Some(FleetLimitsConfig { engine, sync_interval })
    }

    pub(super) fn plans(
        &mut self,
        raw: Option<Parsed<Entries<Parsed<RawPlan>>>>,
    ) -> (BTreeMap<String, PlanConfig>, Option<BTreeSet<String>>) {
        let mut out = BTreeMap::new();
        let Some(parsed) = raw else {
            return (out, Some(BTreeSet::new()));
        };
        let Some(Entries(entries)) = self.issues.take(parsed, "plans") else {
            return (out, None);
        };
        let names = entries.iter().map(|(name, _)| name.clone()).collect();
        for (name, item) in entries {
            let path = join_key("plans", &name);
            if name.trim().is_empty() {
                self.issues.add(&path, "plan names must not be empty");
            }
            let Some(plan) = self.issues.take(item, &path) else {
                continue;
            };
            let rl_path = join_key(&path, "rate_limit");
            let rate_limit = self.parsed(plan.rate_limit, &rl_path).and_then(|rl| self.collect(rl.validate(&rl_path)));
            let quota_path = join_key(&path, "quota");
            let quota = self.parsed(plan.quota, &quota_path).and_then(|q| self.collect(q.validate(&quota_path)));
            out.insert(name, PlanConfig { rate_limit, quota });
        }
        (out, Some(names))
    }

    pub(super) fn collect<T>(&mut self, result: Result<T, Vec<(String, String)>>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(errors) => {
                for (path, message) in errors {
                    self.issues.add(&path, message);
                }
                None
            }
        }
    }

    pub(super) fn default_plan(
        &mut self,
        raw: Option<Parsed<Text>>,
        plans: Option<&BTreeSet<String>>,
    ) -> Option<String> {
        let Text(name) = self.parsed(raw, "default_plan")?;
        if plans.is_some_and(|plans| !plans.contains(&name)) {
            self.issues.add("default_plan", format!("unknown plan {name:?} (not defined under `plans`)"));
        }
        Some(name)
    }
}

impl RawRateLimit {
    /// Checks the values and builds the typed limit; errors carry paths under
    /// `path` (pass "" for bare field names). A limit the rate limiter cannot
    /// enforce as written is refused, naming the field to change.
    pub fn validate(&self, path: &str) -> Result<RateLimitConfig, Vec<(String, String)>> {
        let limit = self.validate_form(path)?;
        crate::config::check_rate_limit(&limit).map_err(|e| vec![(join_key(path, e.field()), e.to_string())])?;
        Ok(limit)
    }

    /// Only the checks that earlier versions made, for limits read back from a
    /// store or a sync feed: refusing one there would fail the whole key set,
    /// and the limiter clamps what it cannot enforce.
    pub(crate) fn validate_form(&self, path: &str) -> Result<RateLimitConfig, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let requests = match self.requests {
            None => {
                errors.push((join_key(path, "requests"), MISSING.to_owned()));
                0
            }
            Some(raw::Num(0)) => {
                errors.push((join_key(path, "requests"), "must be at least 1".to_owned()));
                0
            }
            Some(raw::Num(n)) => n,
        };
        let per = required_duration(self.per.as_ref(), &join_key(path, "per"), &mut errors);
        if self.burst == Some(raw::Num(0)) {
            errors.push((join_key(path, "burst"), "must be at least 1 when given".to_owned()));
        }
        let by = limit_scope(self.by.as_ref(), &join_key(path, "by"), &mut errors);
        if errors.is_empty() {
            Ok(RateLimitConfig { requests, per, burst: self.burst.map(|raw::Num(b)| b), by })
        } else {
            Err(errors)
        }
    }
}

impl RawQuota {
    /// Checks the values and builds the typed quota; errors carry paths under
    /// `path` (pass "" for bare field names). A quota the counters cannot keep
    /// is refused, naming the field to change.
    pub fn validate(&self, path: &str) -> Result<QuotaConfig, Vec<(String, String)>> {
        let quota = self.validate_form(path)?;
        crate::config::check_quota(&quota).map_err(|e| vec![(join_key(path, e.field()), e.to_string())])?;
        Ok(quota)
    }

    /// Only the checks that earlier versions made (see `RawRateLimit::validate_form`).
    pub(crate) fn validate_form(&self, path: &str) -> Result<QuotaConfig, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let requests = match self.requests {
            None => {
                errors.push((join_key(path, "requests"), MISSING.to_owned()));
                0
            }
            Some(raw::Num(0)) => {
                errors.push((join_key(path, "requests"), "must be at least 1".to_owned()));
                0
            }
            Some(raw::Num(n)) => n,
        };
        let per_path = join_key(path, "per");
        let per = match self.per.as_ref().map(|Text(p)| p.trim()) {
            Some("day") => Some(QuotaPeriod::Day),
            Some("month") => Some(QuotaPeriod::Month),
            Some(other) => {
                errors.push((per_path, format!("unknown quota period {other:?}, expected `day` or `month`")));
                None
            }
            None => {
                errors.push((per_path, MISSING.to_owned()));
                None
            }
        };
        let by = limit_scope(self.by.as_ref(), &join_key(path, "by"), &mut errors);
        match per {
            Some(per) if errors.is_empty() => Ok(QuotaConfig { requests, per, by }),
            _ => Err(errors),
        }
    }
}

/// `by: key | owner`; absent means `key`.
fn limit_scope(text: Option<&Text>, path: &str, errors: &mut Vec<(String, String)>) -> LimitScope {
    match text.map(|Text(t)| t.trim()) {
        None | Some("key") => LimitScope::Key,
        Some("owner") => LimitScope::Owner,
        Some(other) => {
            errors.push((path.to_owned(), format!("unknown limit scope {other:?}, expected `key` or `owner`")));
            LimitScope::Key
        }
    }
}

fn required_duration(text: Option<&Text>, path: &str, errors: &mut Vec<(String, String)>) -> Duration {
    match text.map(|Text(s)| parse_duration(s)) {
        None => errors.push((path.to_owned(), MISSING.to_owned())),
        Some(Err(e)) => errors.push((path.to_owned(), e.to_string())),
        Some(Ok(d)) if d.is_zero() => errors.push((path.to_owned(), "must be greater than 0".to_owned())),
        Some(Ok(d)) => return d,
    }
    Duration::ZERO
}
