//! The hardware bundle's steps where they must run: `vm` through a real
//! server against libvirt's test driver (with the real `virsh`, which
//! `tests/run` installs), on the app server and on the hypervisor's own
//! `troupe node`; and `power_oob` against a real Redfish BMC (sushy-tools'
//! emulator) on a real node that advertises the BMC's out-of-band network,
//! waiting while no node does.

use serde_json::json;

use crate::harness::{Db, Env, Server, both_dbs};
use crate::nodes::{Node, connected, join_token};
use crate::power::{Bmc, hardware_bundle};

fn serve_hardware(env: &Env, vars: &[String]) -> Server {
    let mut args = vec!["--bundle", hardware_bundle().to_str().unwrap()];
    for var in vars {
        args.extend(["--var", var.as_str()]);
    }
    env.serve_with(&args)
}

async fn vm_through_a_real_server_and_on_the_hypervisors_node(db: Db) {
    let env = Env::new(db).await;
    let server = serve_hardware(
        &env,
        &[
            "hypervisors=test:///default".to_owned(),
            "bmcs=".to_owned(),
            "bmc_trust=".to_owned(),
            "ssh_hosts=".to_owned(),
        ],
    );
    let vm = |op: &str, domain: &str| json!({ "op": op, "hypervisor": "test:///default", "domain": domain });

    let id = server.submit("vm", "test", vm("status", "test")).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = &done["steps"][0]["output"];
    assert_eq!(out["state"], "running", "{done}");
    assert_eq!(out["summary"], "test on test:///default is running");
    assert!(
        done["steps"][0]["node"].is_null(),
        "ran on the server: {done}"
    );

    // Already running: nothing sent. Destroyed: libvirt says so.
    let id = server.submit("vm", "test", vm("start", "test")).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["steps"][0]["output"]["summary"],
        "test on test:///default is already running: not started"
    );
    let id = server.submit("vm", "test", vm("destroy", "test")).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["output"]["sent"], json!(["destroy"]));
    assert_eq!(done["steps"][0]["output"]["state"], "shut off");

    // An unknown domain fails at once, saying so.
    let id = server.submit("vm", "nope", vm("status", "nope")).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["steps"][0]["error"],
        "there is no domain nope on the hypervisor test:///default (virsh -c test:///default list --all lists them)",
        "{done}"
    );
    assert_eq!(done["steps"][0]["attempt"], 1, "{done}");

    // A hypervisor the operator did not list is refused before anything runs.
    let (status, body) = server
        .post(
            "/v1/actions",
            &json!({ "kind": "vm", "target": "x", "params": { "op": "status", "hypervisor": "qemu:///system", "domain": "x" } }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "param_not_allowed", "{body}");

    // On the hypervisor's own node: it runs there.
    let token = join_token(&server, &env).await;
    let hv = Node::start(&server, &token, "hv-1", &[]);
    connected(&server, &["hv-1"], &[&hv]).await;
    let mut params = vm("status", "test");
    params["node"] = json!("hv-1");
    let id = server.submit("vm_on_node", "test", params).await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", hv.log());
    assert_eq!(done["steps"][0]["node"], "hv-1", "{done}");
    assert_eq!(done["steps"][0]["output"]["state"], "running", "{done}");
}

async fn power_is_placed_on_a_node_in_the_bmcs_out_of_band_network(db: Db) {
    let password = "pw-oob-5d1e7a93";
    let bmc = Bmc::start(password);
    let env = Env::new(db).await;
    let server = serve_hardware(
        &env,
        &[
            format!("bmcs={}", bmc.url),
            format!("bmc_trust={}", bmc.pinned),
        ],
    );
    let (status, body) = server
        .request(
            reqwest::Method::PUT,
            "/v1/secrets/bmc_credentials",
            Some(json!({ "value": format!("admin:{password}") }).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let token = join_token(&server, &env).await;
    let dc1 = Node::start(&server, &token, "oob-dc1", &["--capability", "oob=dc1"]);
    let other = Node::start(&server, &token, "lab-1", &["--capability", "oob=lab"]);
    connected(&server, &["oob-dc1", "lab-1"], &[&dc1, &other]).await;

    let power = |op: &str, oob: &str| json!({ "op": op, "bmc": bmc.url, "oob": oob });
    let id = server
        .submit("power_oob", "srv-1", power("off", "dc1"))
        .await;
    let done = server.finished(id).await;
    assert_eq!(
        done["status"],
        "succeeded",
        "{done}\n{}\n{}",
        dc1.log(),
        bmc.log()
    );
    let step = &done["steps"][0];
    assert_eq!(step["node"], "oob-dc1", "ran on the node in dc1: {done}");
    assert_eq!(step["output"]["reset_type"], "ForceOff", "{done}");
    assert_eq!(step["output"]["power_state"], "Off", "{done}");
    let shown = server.cli(&["status", &id.to_string()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("on oob-dc1"), "{shown}");

    // No node in dc2: the step waits, saying for what, and never runs.
    let id = server
        .submit("power_oob", "srv-1", power("on", "dc2"))
        .await;
    let waiting = server
        .until(id, "its step waiting", |a| {
            a["steps"][0]["status"] == "waiting"
        })
        .await;
    assert_eq!(waiting["steps"][0]["waiting_for"], "oob=dc2", "{waiting}");
    assert_eq!(waiting["steps"][0]["attempt"], 0, "it has not run");
    let shown = server.cli(&["status", &id.to_string()]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("for a node with oob=dc2"), "{shown}");
    let (status, body) = server
        .post(&format!("/v1/actions/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let done = server.finished(id).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["steps"][0]["node"].is_null(), "{done}");

    // The server is still off: the dc2 request did nothing anywhere.
    let id = server
        .submit("power_oob", "srv-1", power("status", "dc1"))
        .await;
    let done = server.finished(id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][0]["output"]["power_state"], "Off", "{done}");

    // The password is in no node's log.
    for log in [dc1.log(), other.log(), server.log()] {
        assert!(!log.contains(password), "the password leaked: {log}");
    }
}

both_dbs!(
    vm_through_a_real_server_and_on_the_hypervisors_node,
    power_is_placed_on_a_node_in_the_bmcs_out_of_band_network,
);
