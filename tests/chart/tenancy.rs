//! Tenants: RegistryAccess through the standard edit and view roles, and the admission policy of
//! the allow-list.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;
use crate::support::k8s::{self, wait_condition};
use crate::support::keycloak::REALM;
use crate::support::{self, Env, Result};

/// Users bound to the standard `edit` role manage RegistryAccess objects in their namespace, users
/// bound to `view` only read them; nothing of it outlives the release.
pub async fn tenants_use_registryaccess_through_the_standard_roles(env: Arc<Env>) -> Result<()> {
    let (ns, app) = ("rao-tenants-system", "tenant-app");
    let admin = env.cluster.client().await?;
    k8s::create_namespace(&admin, app).await?;
    for (user, role) in [("editor", "edit"), ("viewer", "view")] {
        env.cluster.kubectl(&["create", "serviceaccount", user, "-n", app])?;
        let (role, subject) = (format!("--clusterrole={role}"), format!("--serviceaccount={app}:{user}"));
        env.cluster.kubectl(&["create", "rolebinding", user, "-n", app, &role, &subject])?;
    }
    let ra = "registryaccesses.registry-access.io";
    let can = |user: &str, verb: &str, extra: &[&str]| {
        let mut args = vec![verb, ra, "-n", app];
        args.extend_from_slice(extra);
        can_i(&env, app, user, &args)
    };
    assert!(!can("editor", "create", &[])?, "edit included RegistryAccess before the chart was installed");

    let release = Release::install(&env, "rao-tenants", ns, &[])?;
    // The aggregation controller merges the chart's rules into the standard roles.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !can("editor", "create", &[])? {
        if Instant::now() > deadline {
            return Err("edit did not come to include RegistryAccess within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for verb in ["get", "list", "watch", "create", "update", "patch", "delete"] {
        assert!(can("editor", verb, &[])?, "edit may not {verb} RegistryAccess");
    }
    assert!(!can("editor", "patch", &["--subresource=status"])?, "edit may write the status");
    for verb in ["get", "list", "watch"] {
        assert!(can("viewer", verb, &[])?, "view may not {verb} RegistryAccess");
    }
    for verb in ["create", "patch", "delete"] {
        assert!(!can("viewer", verb, &[])?, "view may {verb} RegistryAccess");
    }

    // Real requests as those users.
    let (editor, viewer) =
        (format!("system:serviceaccount:{app}:editor"), format!("system:serviceaccount:{app}:viewer"));
    let object = json!({"apiVersion": "registry-access.io/v1alpha1", "kind": "RegistryAccess",
        "metadata": {"name": "by-editor", "namespace": app},
        "spec": {"server": "https://kc.example.com/auth", "realm": REALM, "clientId": "c", "clientSecretRef": {"name": "creds"}}});
    kubectl_as_user(&env, &editor, &["create", "-f", "-"], Some(&object.to_string()))?;
    kubectl_as_user(
        &env,
        &editor,
        &["annotate", "registryaccess", "by-editor", "-n", app, "registry-access.io/refresh-requested-at=now"],
        None,
    )?;
    let seen = kubectl_as_user(&env, &viewer, &["get", "registryaccess", "by-editor", "-n", app, "-o", "name"], None)?;
    assert!(seen.contains("by-editor"), "{seen}");
    let refused = kubectl_as_user(&env, &viewer, &["delete", "registryaccess", "by-editor", "-n", app], None)
        .err()
        .ok_or("a viewer deleted a RegistryAccess")?;
    assert!(refused.to_string().contains("forbidden"), "{refused}");

    release.uninstall()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while can("editor", "create", &[])? {
        if Instant::now() > deadline {
            return Err("edit still includes RegistryAccess 30 s after the release was uninstalled".into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// With `allowedServers`, the API server itself refuses a RegistryAccess for another server (the
/// chart's ValidatingAdmissionPolicy), with the same prefix rule as the operator's, only in the
/// release's namespaces; an allowed one is admitted and served.
pub async fn the_admission_policy_refuses_servers_outside_the_allow_list(env: Arc<Env>) -> Result<()> {
    let (team, other) = ("vap-team", "vap-other");
    let admin = env.cluster.client().await?;
    for n in [team, other] {
        k8s::create_namespace(&admin, n).await?;
    }
    env.cluster.kubectl(&["create", "serviceaccount", "editor", "-n", team])?;
    env.cluster.kubectl(&[
        "create",
        "rolebinding",
        "editor",
        "-n",
        team,
        "--clusterrole=edit",
        &format!("--serviceaccount={team}:editor"),
    ])?;
    let editor = format!("system:serviceaccount:{team}:editor");
    // An object made before the policy existed, for a server the policy will refuse.
    let elsewhere = "https://elsewhere.example.com/auth";
    env.cluster.kubectl_stdin(&["create", "-f", "-"], &ra_object(team, "legacy", elsewhere))?;

    let kc = env.keycloak.base_url.clone(); // http://127.0.0.1:<port>/auth
    let allowed = vec![kc.clone(), "https://kc.example.com/auth".to_owned()];
    let (watched, allowed_servers) =
        (format!("watchNamespaces={{{team}}}"), format!("allowedServers={{{}}}", allowed.join(",")));
    let release =
        Release::install(&env, "rao-vap", "rao-vap-system", &["allowInsecureHttp=true", &watched, &allowed_servers])?;

    // Policies reach the API server's admission asynchronously: try until the refusal comes.
    let create_dry = |user: &str, ns: &str, name: &str, server: &str| {
        kubectl_as_user(&env, user, &["create", "--dry-run=server", "-f", "-"], Some(&ra_object(ns, name, server)))
    };
    let t = Instant::now();
    let refusal = loop {
        match create_dry(&editor, team, "probe", elsewhere) {
            Err(e) if e.to_string().contains("denied request") => break e.to_string(),
            outcome => {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err(format!("no admission refusal within 30 s; last outcome: {outcome:?}").into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    eprintln!("[e2e] admission policy active after {:.1}s", t.elapsed().as_secs_f64());
    // A real `kubectl apply` as a tenant is refused, with the server and the allowed list.
    let refused = kubectl_as_user(&env, &editor, &["apply", "-f", "-"], Some(&ra_object(team, "elsewhere", elsewhere)))
        .err()
        .ok_or("kubectl apply of a server outside the allow-list succeeded")?
        .to_string();
    for text in [refusal.as_str(), refused.as_str()] {
        assert!(text.contains(elsewhere), "the refusal does not name spec.server: {text}");
        for a in &allowed {
            assert!(text.contains(a.as_str()), "the refusal does not list {a}: {text}");
        }
    }
    assert!(!ra_exists(&admin, team, "elsewhere").await?, "the refused object exists");

    // The same prefix rule as the operator's (src/policy.rs), case by case.
    let port: u16 =
        kc.rsplit(':').next().and_then(|p| p.split('/').next()).and_then(|p| p.parse().ok()).ok_or("port")?;
    let cases = [
        kc.clone(),
        format!("{kc}/"),
        format!("{kc}/realms"),
        format!("{kc}x"),
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}/auth", port + 1),
        format!("https://127.0.0.1:{port}/auth"),
        format!("http://localhost:{port}/auth"),
        "https://kc.example.com/auth".to_owned(),
        "https://KC.Example.com:443/auth/sub/".to_owned(),
        "https://kc.example.com:8443/auth".to_owned(),
        "http://kc.example.com/auth".to_owned(),
        "https://kc.example.com".to_owned(),
        "https://kc.example.com/authx".to_owned(),
        "https://kc.example.com/auth/../admin".to_owned(),
        "https://kc.example.com.evil.example/auth".to_owned(),
    ];
    let mut admitted_any = false;
    for (i, server) in cases.iter().enumerate() {
        let outcome = create_dry(&editor, team, &format!("case-{i}"), server);
        let operator_allows = registry_access_operator::policy::server_allowed(server, &allowed);
        assert_eq!(
            outcome.is_ok(),
            operator_allows,
            "admission and the operator disagree on {server}: operator allows: {operator_allows}, admission: {outcome:?}"
        );
        if let Err(e) = outcome {
            assert!(e.to_string().contains("denied request"), "{server} refused for another reason: {e}");
        }
        admitted_any |= operator_allows;
    }
    assert!(admitted_any);

    // An allowed server is admitted, and the operator with the chart's arguments serves it.
    let mut operator = release.start_operator(None).await?.operator;
    let client = env.keycloak.create_client(REALM, "chart-vap", Some(60), true).await?;
    k8s::put_client_secret(&admin, team, "creds", &[("client_secret", &client.secret)]).await?;
    kubectl_as_user(&env, &editor, &["apply", "-f", "-"], Some(&ra_object(team, "svc", &kc)))?;
    wait_condition(&admin, team, "svc", "Ready", "True", "TokenValid", Duration::from_secs(60)).await?;
    // An update to another server is refused too, and the object keeps its server.
    let patch = json!({"spec": {"server": elsewhere}}).to_string();
    let refused = kubectl_as_user(
        &env,
        &editor,
        &["patch", "registryaccess", "svc", "-n", team, "--type=merge", "-p", &patch],
        None,
    )
    .err()
    .ok_or("an update to a server outside the allow-list succeeded")?;
    assert!(refused.to_string().contains("denied request"), "{refused}");
    let server = env.cluster.kubectl(&["get", "registryaccess", "svc", "-n", team, "-o", "jsonpath={.spec.server}"])?;
    assert_eq!(server, kc);

    // The policy is bound to the release's namespaces only: another namespace is not refused.
    env.cluster.kubectl_stdin(&["create", "--dry-run=server", "-f", "-"], &ra_object(other, "free", elsewhere))?;
    // An object made before the policy can still go, even through the garbage collector's
    // finalizer removal (an UPDATE of an object being deleted).
    env.cluster.kubectl(&[
        "delete",
        "registryaccess",
        "legacy",
        "-n",
        team,
        "--cascade=foreground",
        "--timeout=30s",
    ])?;
    assert!(!ra_exists(&admin, team, "legacy").await?, "legacy still exists");

    operator.check_alive()?;
    assert!(!operator.logs().to_lowercase().contains("forbidden"), "{}", support::process::tail(&operator.log, 20));
    operator.stop();
    release.uninstall()?;
    assert!(
        env.cluster.kubectl(&["get", "validatingadmissionpolicy", &format!("{}-allowed-servers", release.sa)]).is_err(),
        "the admission policy outlived the release"
    );
    Ok(())
}
