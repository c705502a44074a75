//! What the plugin shows, as pure functions of the objects it read and the clock: status rows,
//! one object's details, a token's claims (never the token), and the operator's health.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Event, Secret};
use registry_access_operator::api::RegistryAccess;
use registry_access_operator::keycloak::jwt;
use serde::Serialize;

/// One line of `status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub namespace: String,
    pub name: String,
    /// The Ready condition's status, or "Unknown" before the operator has written one.
    pub ready: String,
    /// Ready's reason, or Degraded's when Degraded is True (it says what to fix).
    pub reason: String,
    /// Seconds until the token expires (negative: expired).
    pub expires_in: Option<i64>,
    /// Seconds until the operator requests the next token.
    pub renew_in: Option<i64>,
    pub roles: Vec<String>,
    pub failed_attempts: u32,
    /// Degraded's message while Degraded is True.
    pub last_failure: Option<String>,
}

/// The status row of `ra` at `now`.
pub fn row(ra: &RegistryAccess, now: Timestamp) -> Row {
    let status = ra.status.clone().unwrap_or_default();
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t);
    let ready = condition("Ready");
    let degraded = condition("Degraded").filter(|c| c.status == "True");
    let secs = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map(|t| t.0.as_second() - now.as_second())
    };
    Row {
        namespace: ra.metadata.namespace.clone().unwrap_or_default(),
        name: ra.metadata.name.clone().unwrap_or_default(),
        ready: ready.map_or_else(|| "Unknown".to_owned(), |c| c.status.clone()),
        reason: degraded.or(ready).map(|c| c.reason.clone()).unwrap_or_default(),
        expires_in: secs(&status.expires_at),
        renew_in: secs(&status.renew_at),
        roles: status.granted_roles.clone(),
        failed_attempts: status.failed_attempts.unwrap_or(0),
        last_failure: degraded.map(|c| c.message.clone()),
    }
}

/// `90s`, `4m10s`, `-12s` (expired), `-` when unknown.
pub fn human(seconds: Option<i64>) -> String {
    match seconds {
        None => "-".to_owned(),
        Some(s) if s.abs() < 120 => format!("{s}s"),
        Some(s) => format!("{}{}m{}s", if s < 0 { "-" } else { "" }, s.abs() / 60, s.abs() % 60),
    }
}

/// The `status` table; the namespace column only with `all_namespaces`.
pub fn table(rows: &[Row], all_namespaces: bool) -> String {
    let mut lines: Vec<Vec<String>> = vec![
        ["NAMESPACE", "NAME", "READY", "REASON", "EXPIRES IN", "RENEW IN", "ROLES", "FAILED", "LAST FAILURE"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for r in rows {
        lines.push(vec![
            r.namespace.clone(),
            r.name.clone(),
            r.ready.clone(),
            r.reason.clone(),
            human(r.expires_in),
            human(r.renew_in),
            if r.roles.is_empty() { "-".to_owned() } else { r.roles.join(",") },
            r.failed_attempts.to_string(),
            r.last_failure.clone().map(|m| shorten(&m, 60)).unwrap_or_else(|| "-".to_owned()),
        ]);
    }
    if !all_namespaces {
        for l in &mut lines {
            l.remove(0);
        }
    }
    columns(&lines)
}

/// Aligns cells into columns separated by three spaces.
pub fn columns(lines: &[Vec<String>]) -> String {
    let width = |i: usize| lines.iter().map(|l| l.get(i).map_or(0, |c| c.chars().count())).max().unwrap_or(0);
    let n = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n).map(width).collect();
    let mut out = String::new();
    for l in lines {
        let cells: Vec<String> = l
            .iter()
            .enumerate()
            .map(|(i, c)| if i + 1 == l.len() { c.clone() } else { format!("{c:<w$}", w = widths[i]) })
            .collect();
        out.push_str(cells.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_owned() } else { format!("{}...", s.chars().take(max).collect::<String>()) }
}

/// One object's details for `status NAME`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Details {
    #[serde(flatten)]
    pub row: Row,
    pub issued_at: Option<String>,
    pub expires_at: Option<String>,
    pub renew_at: Option<String>,
    pub conditions: Vec<ConditionView>,
    pub events: Vec<EventView>,
    /// The token Secret's metadata (never its data: only the names of its keys).
    pub secret: Option<SecretView>,
    /// Why the token Secret is not shown, when it exists but may not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionView {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub since: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
    pub last_seen: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    pub name: String,
    pub created: String,
    pub resource_version: String,
    pub keys: Vec<String>,
    pub annotations: BTreeMap<String, String>,
}

/// `ra`'s details with its Events (newest last, at most 10) and token Secret.
pub fn details(ra: &RegistryAccess, events: &[Event], secret: Option<&Secret>, now: Timestamp) -> Details {
    let status = ra.status.clone().unwrap_or_default();
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| t.as_ref().map(|t| t.0.to_string());
    let mut events: Vec<EventView> = events
        .iter()
        .map(|e| EventView {
            type_: e.type_.clone().unwrap_or_default(),
            reason: e.reason.clone().unwrap_or_default(),
            message: e.message.clone().unwrap_or_default(),
            count: e.count.unwrap_or(1),
            last_seen: e
                .last_timestamp
                .as_ref()
                .map(|t| t.0.to_string())
                .or_else(|| e.event_time.as_ref().map(|t| t.0.to_string()))
                .unwrap_or_default(),
        })
        .collect();
    events.sort_by(|a, b| a.last_seen.cmp(&b.last_seen));
    let keep = events.len().saturating_sub(10);
    events.drain(..keep);
    Details {
        row: row(ra, now),
        issued_at: time(&status.issued_at),
        expires_at: time(&status.expires_at),
        renew_at: time(&status.renew_at),
        conditions: status
            .conditions
            .iter()
            .map(|c| ConditionView {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                since: c.last_transition_time.0.to_string(),
            })
            .collect(),
        events,
        secret: secret.map(|s| SecretView {
            name: s.metadata.name.clone().unwrap_or_default(),
            created: s.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()).unwrap_or_default(),
            resource_version: s.metadata.resource_version.clone().unwrap_or_default(),
            keys: s.data.as_ref().map(|d| d.keys().cloned().collect()).unwrap_or_default(),
            annotations: s.metadata.annotations.clone().unwrap_or_default(),
        }),
        secret_note: None,
    }
}

/// The human form of [`Details`].
pub fn details_text(d: &Details) -> String {
    let r = &d.row;
    let mut out = format!("Name:        {}/{}\n", r.namespace, r.name);
    out.push_str(&format!("Ready:       {} ({})\n", r.ready, r.reason));
    out.push_str(&format!("Issued:      {}\n", d.issued_at.as_deref().unwrap_or("-")));
    out.push_str(&format!("Expires:     {} (in {})\n", d.expires_at.as_deref().unwrap_or("-"), human(r.expires_in)));
    out.push_str(&format!("Renews:      {} (in {})\n", d.renew_at.as_deref().unwrap_or("-"), human(r.renew_in)));
    out.push_str(&format!("Roles:       {}\n", if r.roles.is_empty() { "-".to_owned() } else { r.roles.join(", ") }));
    out.push_str(&format!("Failed:      {}\n", r.failed_attempts));
    out.push_str("Conditions:\n");
    let mut lines = vec![["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"].map(str::to_owned).to_vec()];
    lines.extend(
        d.conditions
            .iter()
            .map(|c| vec![c.type_.clone(), c.status.clone(), c.reason.clone(), c.since.clone(), c.message.clone()]),
    );
    out.push_str(&indent(&columns(&lines)));
    out.push_str("Events:\n");
    if d.events.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut lines = vec![["LAST SEEN", "TYPE", "REASON", "COUNT", "MESSAGE"].map(str::to_owned).to_vec()];
        lines.extend(d.events.iter().map(|e| {
            vec![e.last_seen.clone(), e.type_.clone(), e.reason.clone(), e.count.to_string(), e.message.clone()]
        }));
        out.push_str(&indent(&columns(&lines)));
    }
    match &d.secret {
        None => out.push_str(&format!("Token Secret: {}\n", d.secret_note.as_deref().unwrap_or("<none>"))),
        Some(s) => {
            out.push_str(&format!(
                "Token Secret: {} (created {}, resourceVersion {})\n",
                s.name, s.created, s.resource_version
            ));
            out.push_str(&format!("  keys: {}\n", s.keys.join(", ")));
            for (k, v) in &s.annotations {
                out.push_str(&format!("  {k}: {v}\n"));
            }
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The claims `inspect` shows: who issued the token, to which client, what it grants, when.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenClaims {
    pub issuer: Option<String>,
    /// `azp`: the client the token was issued to.
    pub client: Option<String>,
    pub subject: Option<String>,
    pub audience: Vec<String>,
    pub realm_roles: Vec<String>,
    pub scope: Option<String>,
    pub issued_at: Option<String>,
    pub expires_at: Option<String>,
    /// Seconds left at the time of the call.
    pub expires_in: Option<i64>,
}

/// The claims of `token` (read by the operator's own decoder), or why they cannot be read; the
/// message never holds the token.
pub fn claims(token: &str, now: Timestamp) -> Result<TokenClaims, String> {
    let c = jwt::decode_claims(token.trim()).map_err(|e| e.to_string())?;
    let time = |s: Option<i64>| s.and_then(|s| Timestamp::from_second(s).ok()).map(|t| t.to_string());
    Ok(TokenClaims {
        issuer: c.issuer,
        client: c.client,
        subject: c.subject,
        audience: c.audience,
        realm_roles: c.realm_roles,
        scope: c.scope,
        issued_at: time(c.iat),
        expires_at: time(c.exp),
        expires_in: c.exp.map(|e| e - now.as_second()),
    })
}

/// The human form of [`TokenClaims`].
pub fn claims_text(c: &TokenClaims) -> String {
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".to_owned());
    let list = |l: &[String]| if l.is_empty() { "-".to_owned() } else { l.join(", ") };
    format!(
        "Issuer:      {}\nClient:      {}\nSubject:     {}\nAudience:    {}\nRealm roles: {}\nScope:       {}\nIssued at:   {}\nExpires at:  {} (in {})\n",
        opt(&c.issuer),
        opt(&c.client),
        opt(&c.subject),
        list(&c.audience),
        list(&c.realm_roles),
        opt(&c.scope),
        opt(&c.issued_at),
        opt(&c.expires_at),
        human(c.expires_in)
    )
}

/// What `check` found.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub crd_installed: bool,
    pub served_versions: Vec<String>,
    pub storage_version: Option<String>,
    /// namespace/name of each operator Lease with its holder (None: nobody holds it).
    pub leases: Vec<(String, Option<String>)>,
    /// Why no Lease could be looked at, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_note: Option<String>,
    pub objects: usize,
    pub ready: usize,
    /// Objects not Ready, by reason.
    pub not_ready: BTreeMap<String, usize>,
    /// Objects Degraded, by reason.
    pub degraded: BTreeMap<String, usize>,
}

/// Counts `objects` by readiness and by the reasons of Ready=False and Degraded=True.
pub fn count(health: &mut Health, objects: &[RegistryAccess]) {
    health.objects = objects.len();
    for ra in objects {
        let conditions = ra.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        match conditions.iter().find(|c| c.type_ == "Ready") {
            Some(c) if c.status == "True" => health.ready += 1,
            Some(c) => *health.not_ready.entry(c.reason.clone()).or_default() += 1,
            None => *health.not_ready.entry("NotYetReconciled".to_owned()).or_default() += 1,
        }
        if let Some(c) = conditions.iter().find(|c| c.type_ == "Degraded" && c.status == "True") {
            *health.degraded.entry(c.reason.clone()).or_default() += 1;
        }
    }
}

/// The human form of [`Health`].
pub fn health_text(h: &Health) -> String {
    let mut out = String::new();
    if h.crd_installed {
        out.push_str(&format!(
            "CRD:       registryaccesses.registry-access.io installed; served {}; stored as {}\n",
            h.served_versions.join(", "),
            h.storage_version.as_deref().unwrap_or("-")
        ));
    } else {
        out.push_str("CRD:       registryaccesses.registry-access.io is NOT installed: kubectl apply -f crds/\n");
    }
    if let Some(note) = &h.lease_note {
        out.push_str(&format!("Operator:  {note}\n"));
    } else if h.leases.is_empty() {
        out.push_str("Operator:  no Lease found (leader election off, or the operator is not running)\n");
    }
    for (lease, holder) in &h.leases {
        match holder {
            Some(holder) => out.push_str(&format!("Operator:  Lease {lease} held by {holder}\n")),
            None => out.push_str(&format!("Operator:  Lease {lease} held by nobody: no operator is writing\n")),
        }
    }
    out.push_str(&format!("Objects:   {} ({} Ready)\n", h.objects, h.ready));
    for (reason, n) in &h.not_ready {
        out.push_str(&format!("  not Ready, {reason}: {n}\n"));
    }
    for (reason, n) in &h.degraded {
        out.push_str(&format!("  Degraded, {reason}: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn ra(ready: (&str, &str), degraded: Option<(&str, &str)>) -> RegistryAccess {
        let mut conditions = vec![serde_json::json!({
            "type": "Ready", "status": ready.0, "reason": ready.1, "message": "m",
            "lastTransitionTime": "2026-11-30T12:00:00Z",
        })];
        if let Some((reason, message)) = degraded {
            conditions.push(serde_json::json!({
                "type": "Degraded", "status": "True", "reason": reason, "message": message,
                "lastTransitionTime": "2026-11-30T12:00:00Z",
            }));
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
            "metadata": {"name": "a", "namespace": "team"},
            "spec": {"server": "https://kc", "realm": "r", "clientId": "c", "clientSecretRef": {"name": "s"}},
            "status": {
                "expiresAt": "2026-11-30T12:05:00Z", "renewAt": "2026-11-30T12:02:13Z",
                "grantedRoles": ["trembita-invoker"], "failedAttempts": 2, "conditions": conditions,
            },
        }))
        .unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-30T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_row_says_what_to_fix_when_degraded() {
        let r = row(&ra(("True", "TokenValid"), Some(("KeycloakUnavailable", "cannot connect"))), now());
        assert_eq!((r.ready.as_str(), r.reason.as_str()), ("True", "KeycloakUnavailable"));
        assert_eq!((r.expires_in, r.renew_in), (Some(300), Some(133)));
        assert_eq!(r.last_failure.as_deref(), Some("cannot connect"));
        let t = table(&[r], false);
        assert!(t.starts_with("NAME   READY   REASON"), "{t}");
        assert!(t.contains("5m0s") && t.contains("2m13s") && t.contains("trembita-invoker"), "{t}");
    }

    #[test]
    fn claims_show_what_the_token_grants_and_not_the_token() {
        let payload = URL_SAFE_NO_PAD.encode(
            serde_json::json!({
                "iss": "https://kc/realms/r", "azp": "c", "sub": "u", "aud": "account",
                "realm_access": {"roles": ["trembita-invoker"]}, "scope": "profile",
                "iat": 1_764_504_000, "exp": 1_764_504_300,
            })
            .to_string(),
        );
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.c2ln");
        let c = claims(&token, Timestamp::from_second(1_764_504_100).unwrap()).unwrap();
        assert_eq!(c.client.as_deref(), Some("c"));
        assert_eq!(c.realm_roles, vec!["trembita-invoker"]);
        assert_eq!(c.audience, vec!["account"]);
        assert_eq!(c.expires_in, Some(200));
        let text = claims_text(&c);
        assert!(!text.contains(&payload) && !text.contains("c2ln"), "{text}");
        assert!(claims("not-a-jwt", now()).unwrap_err().contains("not a JWT"));
    }

    #[test]
    fn health_counts_by_reason() {
        let mut h = Health { crd_installed: true, ..Health::default() };
        count(
            &mut h,
            &[
                ra(("True", "TokenValid"), None),
                ra(("True", "TokenValid"), Some(("RenewBeforeTooShort", "x"))),
                ra(("False", "InvalidClientCredentials"), Some(("InvalidClientCredentials", "y"))),
            ],
        );
        assert_eq!((h.objects, h.ready), (3, 2));
        assert_eq!(h.not_ready.get("InvalidClientCredentials"), Some(&1));
        assert_eq!(h.degraded.get("RenewBeforeTooShort"), Some(&1));
        assert!(health_text(&h).contains("Degraded, InvalidClientCredentials: 1"));
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human(Some(45)), "45s");
        assert_eq!(human(Some(250)), "4m10s");
        assert_eq!(human(Some(-130)), "-2m10s");
        assert_eq!(human(None), "-");
    }
}
