//! The kubectl plugin: status, renew, inspect and check, as an admin and as a user with fewer
//! rights.

use std::sync::Arc;

use serde_json::Value;

use crate::support::case::*;
use crate::support::keycloak::{REALM, ROLE};
use crate::support::{self, Env, Result};

/// `kubectl registry-access`: `status` shows the objects Ready with their roles, `renew --all
/// --wait` gives exactly one new token per object (Keycloak's grant count), `inspect` prints the
/// claims and neither the token nor the client secret, `check` names the Lease holder, and a
/// user without Secret access gets the missing right named.
pub async fn kubectl_plugin_status_renew_inspect_check(env: Arc<Env>) -> Result<()> {
    let lease = "plugin-registry-access-operator";
    let c = Case::with_operator_env(
        env.clone(),
        "plugin",
        &[
            "--leader-election",
            "--leader-election-namespace=e2e-plugin",
            &format!("--leader-election-lease-name={lease}"),
        ],
        &[("POD_NAME", "plugin-operator")],
    )
    .await?;
    let (client_id, client) = c.client_with_creds("plugin", None).await?;
    for name in ["alpha", "beta"] {
        c.ra(name, c.spec(c.kc(), &client_id, "creds")).await?;
        c.ready(name).await?;
    }
    let admin = &env.cluster.kubeconfig;
    let ns = c.ns.as_str();

    let (ok, out, err) = plugin(admin, &["-n", ns, "status"])?;
    assert!(ok, "status failed: {err}");
    let alpha = out.lines().find(|l| l.starts_with("alpha")).ok_or(format!("no alpha row:\n{out}"))?;
    assert!(alpha.contains("True") && alpha.contains("TokenValid") && alpha.contains(ROLE), "{out}");
    let (ok, out, _) = plugin(admin, &["-n", ns, "status", "-o", "json"])?;
    let rows: Value = serde_json::from_str(&out)?;
    assert!(ok && rows.as_array().map(Vec::len) == Some(2), "{out}");
    assert!(rows[0]["ready"] == "True" && rows[0]["roles"][0] == ROLE, "{out}");
    let (ok, out, err) = plugin(admin, &["-n", ns, "status", "alpha"])?;
    assert!(ok, "status alpha failed: {err}");
    assert!(out.contains("Token Secret: alpha-token") && out.contains("TokenIssued") && out.contains("Ready"), "{out}");

    let grants = c.kc().grants(REALM, &client_id).await?;
    assert_eq!(grants, 2);
    let (ok, out, err) = plugin(admin, &["-n", ns, "renew", "--all", "--wait", "--timeout=60"])?;
    assert!(ok, "renew failed: {err}");
    assert_eq!(out.matches("renewed, new token issued at").count(), 2, "{out}");
    assert_eq!(c.kc().grants(REALM, &client_id).await?, 4, "renew --all gives exactly one grant per object");

    let token = c.access_token("alpha-token").await?;
    let (ok, out, err) = plugin(admin, &["-n", ns, "inspect", "alpha"])?;
    assert!(ok, "inspect failed: {err}");
    assert!(out.contains(&format!("Client:      {client_id}")) && out.contains(ROLE), "{out}");
    assert!(out.contains(&format!("Issuer:      {}", c.kc().issuer(REALM))), "{out}");
    let payload = token.split('.').nth(1).unwrap_or_default();
    for (what, secret) in
        [("token", token.as_str()), ("token payload", payload), ("client secret", client.secret.as_str())]
    {
        assert!(!out.contains(secret) && !err.contains(secret), "inspect printed the {what}");
    }

    let (ok, out, err) = plugin(admin, &["check"])?;
    assert!(ok, "check failed: {err}");
    assert!(out.contains(&format!("Lease e2e-plugin/{lease} held by plugin-operator")), "{out}");
    assert!(out.contains("registryaccesses.registry-access.io installed; served v1alpha1"), "{out}");

    // A user who may read RegistryAccess objects but not Secrets.
    let viewer = env.cluster.ca.client("plugin-viewer", &[])?;
    let kubeconfig = env.path().join("plugin-viewer.kubeconfig");
    std::fs::write(
        &kubeconfig,
        support::cluster::kubeconfig_with_cert(&env.cluster.server, &env.cluster.ca_pem, "plugin-viewer", &viewer),
    )?;
    env.cluster.kubectl(&[
        "create",
        "role",
        "ra-reader",
        "-n",
        ns,
        "--verb=get,list",
        "--resource=registryaccesses",
    ])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "ra-reader",
        "-n",
        ns,
        "--role=ra-reader",
        "--user=plugin-viewer",
    ])?;
    let (ok, _, err) = plugin(&kubeconfig, &["-n", ns, "inspect", "alpha"])?;
    assert!(!ok, "inspect succeeded without Secret access");
    assert!(
        err.contains(&format!("you may not read Secrets in namespace {ns}: inspect needs get on secrets")),
        "{err}"
    );
    env.cluster.kubectl(&["create", "role", "ra-events", "-n", ns, "--verb=list", "--resource=events"])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "ra-events",
        "-n",
        ns,
        "--role=ra-events",
        "--user=plugin-viewer",
    ])?;
    let (ok, out, err) = plugin(&kubeconfig, &["-n", ns, "status", "alpha"])?;
    assert!(ok && out.contains("Ready:       True (TokenValid)"), "status NAME without Secret access: {err}{out}");
    assert!(out.contains("alpha-token: not shown (you may not get secrets in namespace e2e-plugin)"), "{out}");
    let (ok, _, err) = plugin(&kubeconfig, &["-n", "default", "status"])?;
    assert!(
        !ok && err
            .contains("you may not list registryaccesses in namespace default: status needs list on registryaccesses"),
        "{err}"
    );
    c.finish().await
}
