//! Concurrency limits: at most `max` attempts at once hold one key of a
//! limit (`[limits.bmc] max = 1` in a manifest, a step use's
//! `limits = { bmc = "{{params.bmc}}" }`), across every server sharing the
//! database. The slots are rows of `limit_holds` (`store/limits.rs`), so
//! the database, not a server's memory, says who holds what; a server only
//! remembers whom to wake when it gives a slot back.
//!
//! An attempt claims every key its step use names before its start is
//! recorded, one limit after another in name order, and gives back what it
//! holds when one is full (no attempt holds one slot while waiting for
//! another, so two cannot wait for each other). While it waits, its step
//! reads `waiting` with `waiting_for = "bmc limit https://10.0.0.5"`; it is
//! the running action of its target, so the target's later actions wait
//! behind it and per-target order holds. When this server gives a slot
//! back it wakes the step here that has waited longest for that key (one:
//! the others stay asleep rather than all racing for it), and every
//! waiting step looks again every [`Limits::poll`] for slots given back
//! elsewhere (or whose holder died).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

use crate::agency::AgencyHandle;
use crate::bundle::manifest::LimitDef;
use crate::bundle::template;
use crate::model::ActionId;
use crate::store::{Claim, Hold, Store};
use crate::tasks::{self, TaskKind};

/// The longest key stored as it is; a longer one is stored as its SHA-256.
const MAX_STORED_KEY: usize = 255;

/// An operator's setting of a limit's max (`--limit bmc=4`), for every key
/// or one (`--limit power:dc1=10`): it wins over the manifest's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSetting {
    pub name: String,
    pub key: Option<String>,
    pub max: u32,
}

impl std::str::FromStr for LimitSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let shape = || {
            format!(
                "{s:?}: give NAME=MAX (every key of limit NAME) or NAME:KEY=MAX (that key only), e.g. bmc=4 or power:dc1=10"
            )
        };
        let (what, max) = s.rsplit_once('=').ok_or_else(shape)?;
        let (name, key) = match what.split_once(':') {
            Some((name, key)) if !key.is_empty() => (name, Some(key.to_owned())),
            Some(_) => return Err(shape()),
            None => (what, None),
        };
        if !troupe_bundle::names::is_capability_name(name) {
            return Err(format!(
                "{s:?}: {name:?} is not a limit name (letters, digits, '_', '-', '.'; at most 64)"
            ));
        }
        let max: u32 = max.trim().parse().map_err(|_| shape())?;
        let most = troupe_bundle::manifest::MAX_LIMIT;
        if !(1..=most).contains(&max) {
            return Err(format!("{s:?}: a max is 1 to {most}"));
        }
        Ok(LimitSetting {
            name: name.to_owned(),
            key,
            max,
        })
    }
}

/// This server's view of the limits: the operator's settings, and per key
/// the steps here waiting for it, woken one at a time, longest first, as
/// this server gives a slot of it back.
pub(crate) struct Limits {
    settings: BTreeMap<(String, Option<String>), u32>,
    waiting: Mutex<HashMap<(String, String), Arc<Notify>>>,
    /// How often a waiting step looks again without being woken.
    pub(crate) poll: Duration,
}

impl Limits {
    /// `several`: other servers share the database, and give slots back
    /// without waking this one's steps, so those look more often.
    pub(crate) fn new(settings: &[LimitSetting], several: bool) -> Limits {
        Limits {
            settings: settings
                .iter()
                .map(|s| ((s.name.clone(), s.key.clone()), s.max))
                .collect(),
            waiting: Mutex::default(),
            // Alone, every slot given back wakes a step here: the poll only
            // finds slots whose holder died. With several servers it is how
            // a slot given back elsewhere is seen: often enough for steps
            // that take seconds, seldom enough that a hundred waiting steps
            // cost the database a few hundred small statements a second.
            poll: if several {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(10)
            },
        }
    }

    /// The max of `name` for `key`: the operator's for that key, else for
    /// the limit, else the manifest's.
    fn max(&self, name: &str, key: &str, def: &LimitDef) -> u32 {
        self.settings
            .get(&(name.to_owned(), Some(key.to_owned())))
            .or_else(|| self.settings.get(&(name.to_owned(), None)))
            .copied()
            .unwrap_or(def.max)
    }

    /// Warns of each `--limit` that no active bundle declares: a misspelt
    /// name would otherwise be ignored without a word. It is kept, and
    /// takes effect once a bundle declaring it is active.
    pub(crate) async fn warn_undeclared(&self, agency: &AgencyHandle) -> crate::Result<()> {
        let states = agency.states().await?;
        let declared = states
            .iter()
            .filter(|state| state.active)
            .flat_map(|state| state.bundle.manifest.limits.keys())
            .map(String::as_str)
            .collect();
        for name in self.undeclared(&declared) {
            tracing::warn!(
                limit = name,
                "--limit {name}: no active bundle declares a limit {name:?}; check the name against `troupe kinds` \
                 (the setting is kept, and applies once a bundle declaring it is active)"
            );
        }
        Ok(())
    }

    /// The limits the operator set (`--limit`) that no name in `declared`
    /// matches: a typo, or a bundle not pushed yet. Each name once.
    fn undeclared(&self, declared: &BTreeSet<&str>) -> BTreeSet<&str> {
        self.settings
            .keys()
            .map(|(name, _)| name.as_str())
            .filter(|name| !declared.contains(name))
            .collect()
    }

    /// The max of `name` for every key the operator did not name, and
    /// those he did (`dc1=10`).
    pub(crate) fn maxes(&self, name: &str, def: &LimitDef) -> (u32, Vec<String>) {
        let all = self
            .settings
            .get(&(name.to_owned(), None))
            .copied()
            .unwrap_or(def.max);
        let keys = self
            .settings
            .iter()
            .filter_map(|((n, key), max)| {
                (n == name)
                    .then_some(key.as_ref()?)
                    .map(|k| format!("{k}={max}"))
            })
            .collect();
        (all, keys)
    }

    /// What the steps waiting here for `want`'s key wait on.
    pub(crate) fn waiting_for(&self, want: &Want) -> Arc<Notify> {
        self.queue(&want.name, &want.stored())
    }

    fn queue(&self, name: &str, stored: &str) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().expect("limits' waiting lock");
        // Keys nobody waits for or holds any more go, so the map stays as
        // small as the keys in use.
        if waiting.len() >= 1024 {
            waiting.retain(|_, n| Arc::strong_count(n) > 1);
        }
        waiting
            .entry((name.to_owned(), stored.to_owned()))
            .or_default()
            .clone()
    }
}

/// One key of a limit an attempt must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Want {
    pub(crate) name: String,
    /// The key as resolved: shown to operators.
    pub(crate) key: String,
    pub(crate) max: u32,
}

impl std::fmt::Display for Want {
    /// What a waiting step reads: `bmc limit https://10.0.0.5`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} limit {}", self.name, self.key)
    }
}

impl Want {
    /// The key as `limit_holds` stores it.
    fn stored(&self) -> String {
        if self.key.len() <= MAX_STORED_KEY {
            return self.key.clone();
        }
        let digest = Sha256::digest(self.key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// The keys a step use's `limits` name, resolved against `scope` (which
/// has the target's record). A key that names a record attribute the
/// record lacks, or that resolves to nothing, holds no slot: a target with
/// no `site` is not limited by site.
pub(crate) fn wants(
    uses: &BTreeMap<String, String>,
    defs: &BTreeMap<String, LimitDef>,
    scope: &Value,
    limits: &Limits,
) -> Result<Vec<Want>, String> {
    let mut out = Vec::with_capacity(uses.len());
    for (name, template) in uses {
        let Some(def) = defs.get(name) else {
            return Err(format!("limit {name:?} is not declared in the manifest"));
        };
        let paths = template::paths(&Value::from(template.as_str()))?;
        let absent = paths.iter().any(|p| {
            p.strip_prefix("target.")
                .is_some_and(|key| scope["record"].get(key).is_none())
        });
        if absent {
            continue;
        }
        let key = match template::resolve(&Value::from(template.as_str()), scope)? {
            Value::String(s) => s,
            Value::Null => String::new(),
            other => other.to_string(),
        };
        if key.is_empty() {
            continue;
        }
        let max = limits.max(name, &key, def);
        out.push(Want {
            name: name.clone(),
            key,
            max,
        });
    }
    Ok(out)
}

/// Who claims: the attempt, fenced like every write of its action.
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub(crate) action: ActionId,
    pub(crate) epoch: i64,
    pub(crate) seq: u32,
    pub(crate) attempt: u32,
    pub(crate) owner: String,
}

/// The slots an attempt holds; given back when dropped (on a task of its
/// own, so every way out of an attempt gives them back). A slot whose
/// giving back fails stays until a claimer finds its attempt ended.
pub(crate) struct Held {
    store: Store,
    /// Each hold, its slot, and whom to wake when it goes back.
    holds: Vec<(Hold, u32, Arc<Notify>)>,
}

impl Held {
    async fn give_back(store: Store, holds: Vec<(Hold, u32, Arc<Notify>)>) {
        for (hold, slot, waiting) in &holds {
            match store.release_limit(hold, *slot).await {
                // The step here that has waited longest for it looks again.
                Ok(_) => waiting.notify_one(),
                Err(e) => {
                    tracing::warn!(limit = %hold.name, key = %hold.key, action_id = hold.action, error = %e,
                    "could not give a limit's slot back; it is freed once its attempt is seen ended")
                }
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.holds.is_empty() {
            return;
        }
        let holds = std::mem::take(&mut self.holds);
        let store = self.store.clone();
        tasks::spawn(TaskKind::LimitRelease, Held::give_back(store, holds));
    }
}

/// Claims every key of `wants` for `holder`, in name order: all of them
/// (`Ok(Ok(held))`), or none, naming the first that is full (`Ok(Err)`).
pub(crate) async fn claim(
    store: &Store,
    limits: &Limits,
    wants: &[Want],
    holder: &Holder,
) -> crate::Result<Result<Held, Want>> {
    let mut held = Held {
        store: store.clone(),
        holds: Vec::with_capacity(wants.len()),
    };
    let mut sorted: Vec<&Want> = wants.iter().collect();
    sorted.sort_by(|a, b| (&a.name, &a.key).cmp(&(&b.name, &b.key)));
    for want in sorted {
        let hold = Hold {
            name: want.name.clone(),
            key: want.stored(),
            action: holder.action,
            epoch: holder.epoch,
            seq: holder.seq,
            attempt: holder.attempt,
            owner: holder.owner.clone(),
        };
        match store.claim_limit(&hold, want.max).await? {
            Claim::Held(slot) => {
                let waiting = limits.queue(&hold.name, &hold.key);
                held.holds.push((hold, slot, waiting));
            }
            // What it holds goes back (dropped) before it waits.
            Claim::Full => return Ok(Err(want.clone())),
        }
    }
    Ok(Ok(held))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_read_a_limit_or_one_key_of_it() {
        let s: LimitSetting = "bmc=4".parse().unwrap();
        assert_eq!((s.name.as_str(), s.key, s.max), ("bmc", None, 4));
        let s: LimitSetting = "power:dc1=10".parse().unwrap();
        assert_eq!(
            (s.name.as_str(), s.key.as_deref(), s.max),
            ("power", Some("dc1"), 10)
        );
        // A key may hold ':' and '=' of its own (a URL): the max is after the last '='.
        let s: LimitSetting = "bmc:https://10.0.0.5:8443=2".parse().unwrap();
        assert_eq!(s.key.as_deref(), Some("https://10.0.0.5:8443"));
        for bad in [
            "bmc",
            "bmc=",
            "bmc=0",
            "bmc=10001",
            "bmc:=3",
            "b c=1",
            "=1",
            "bmc=x",
        ] {
            assert!(bad.parse::<LimitSetting>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn keys_resolve_with_the_record_and_settings_choose_the_max() {
        let defs: BTreeMap<String, LimitDef> = [
            (
                "bmc".to_owned(),
                LimitDef {
                    description: String::new(),
                    max: 1,
                },
            ),
            (
                "power".to_owned(),
                LimitDef {
                    description: String::new(),
                    max: 20,
                },
            ),
        ]
        .into();
        let uses: BTreeMap<String, String> = [
            ("bmc".to_owned(), "{{params.bmc}}".to_owned()),
            ("power".to_owned(), "{{target.site}}".to_owned()),
        ]
        .into();
        let limits = Limits::new(
            &["power=50".parse().unwrap(), "power:dc1=5".parse().unwrap()],
            false,
        );
        let scope = |site: Option<&str>| {
            let mut scope = json!({ "target": "vps-1", "params": { "bmc": "https://10.0.0.5" } });
            scope["record"] = match site {
                Some(s) => json!({ "site": s }),
                None => json!({}),
            };
            scope
        };
        let got = wants(&uses, &defs, &scope(Some("dc1")), &limits).unwrap();
        assert_eq!(
            got.iter()
                .map(|w| (w.to_string(), w.max))
                .collect::<Vec<_>>(),
            [
                ("bmc limit https://10.0.0.5".to_owned(), 1),
                ("power limit dc1".to_owned(), 5)
            ]
        );
        let got = wants(&uses, &defs, &scope(Some("dc2")), &limits).unwrap();
        assert_eq!(got[1].max, 50);
        // No site: not limited by site.
        let got = wants(&uses, &defs, &scope(None), &limits).unwrap();
        assert_eq!(got.len(), 1);
        let mut none = scope(None);
        none["record"] = Value::Null;
        assert_eq!(wants(&uses, &defs, &none, &limits).unwrap().len(), 1);
        // An empty key holds nothing either.
        assert!(wants(&uses, &defs, &scope(Some("")), &limits).unwrap()[1..].is_empty());
    }

    /// An action running at epoch 1 on target `target`, and its holder
    /// for step 0's attempt `attempt`.
    async fn running(store: &Store, target: &str, attempt: u32) -> Holder {
        use crate::model::NewAction;
        use crate::store::{Outcome, Write};
        let now = crate::model::now();
        let insert = Write::Insert {
            new: NewAction {
                kind: "power".into(),
                target: target.into(),
                params: serde_json::Map::new(),
                idempotency_key: None,
                bundle: None,
                submitted_by: None,
            },
            bundle: "b".repeat(64),
            request_hash: "h".repeat(64),
            owner: Some("here".into()),
            steps: vec![("cycle".into(), "power".into())],
            at: now,
            start: Some(now + chrono::Duration::seconds(60)),
            node: None,
        };
        let Outcome::Inserted(action) = store.write(vec![insert]).await.unwrap()[0] else {
            panic!("not inserted");
        };
        let epoch = store.action(action).await.unwrap().unwrap().epoch;
        Holder {
            action,
            epoch,
            seq: 0,
            attempt,
            owner: "here".into(),
        }
    }

    fn want(name: &str, key: &str, max: u32) -> Want {
        Want {
            name: name.into(),
            key: key.into(),
            max,
        }
    }

    async fn holders(store: &Store) -> Vec<(String, String, u32, ActionId)> {
        let mut rows: Vec<_> = store
            .limit_holds()
            .await
            .unwrap()
            .into_iter()
            .map(|h| (h.name, h.key, h.slot, h.action_id))
            .collect();
        rows.sort();
        rows
    }

    /// Against a real (SQLite) store: an attempt gets every key or none, a
    /// key holds no more than its max, slots go back when what holds them
    /// is dropped (waking a step waiting here), and a slot whose attempt
    /// ended without giving it back is taken by the next claimer.
    #[tokio::test]
    async fn claims_take_every_key_or_none_and_come_back() {
        let store = Store::connect(&crate::store::tests::sqlite_url("limits"))
            .await
            .unwrap();
        let limits = Limits::new(&[], false);
        let (a, b, c) = (
            running(&store, "t-a", 1).await,
            running(&store, "t-b", 1).await,
            running(&store, "t-c", 1).await,
        );
        let both = [want("bmc", "k", 1), want("power", "dc1", 2)];
        let held_a = claim(&store, &limits, &both, &a).await.unwrap().unwrap();
        let two = [want("bmc", "k2", 1), want("power", "dc1", 2)];
        let held_c = claim(&store, &limits, &two, &c).await.unwrap().unwrap();
        assert_eq!(
            holders(&store).await,
            [
                ("bmc".into(), "k".into(), 0, a.action),
                ("bmc".into(), "k2".into(), 0, c.action),
                ("power".into(), "dc1".into(), 0, a.action),
                ("power".into(), "dc1".into(), 1, c.action),
            ]
        );
        // b gets `bmc kb` (name order) but `power dc1` is full: it gives
        // `bmc kb` back and is told what it waits for.
        let full = claim(
            &store,
            &limits,
            &[want("bmc", "kb", 1), want("power", "dc1", 2)],
            &b,
        )
        .await
        .unwrap()
        .err();
        assert_eq!(full, Some(want("power", "dc1", 2)));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while holders(&store).await.iter().any(|h| h.3 == b.action) {
            assert!(
                std::time::Instant::now() < deadline,
                "b kept a slot it could not use"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let full = claim(&store, &limits, &both, &b).await.unwrap().err();
        assert_eq!(full, Some(want("bmc", "k", 1)), "one slot of bmc k");

        // a's slots go back when dropped, and the steps waiting here for
        // them are woken.
        let (bmc, power) = (
            limits.waiting_for(&want("bmc", "k", 1)),
            limits.waiting_for(&want("power", "dc1", 2)),
        );
        let woken = async { tokio::join!(bmc.notified(), power.notified()) };
        drop(held_a);
        tokio::time::timeout(Duration::from_secs(30), woken)
            .await
            .expect("waiting steps are woken when slots come back");
        let held_b = claim(&store, &limits, &both, &b).await.unwrap().unwrap();
        assert!(holders(&store).await.iter().all(|h| h.3 != a.action));

        // c's attempt ends (its action finishes) without giving its slots
        // back: the next claimer finds them dead and takes one.
        std::mem::forget(held_c);
        let finish = crate::store::Write::Finish {
            id: c.action,
            status: crate::model::ActionStatus::Failed,
            error: Some("gone".into()),
            at: crate::model::now(),
            last: None,
        };
        store.write(vec![finish]).await.unwrap();
        let d = running(&store, "t-d", 1).await;
        let held_d = claim(&store, &limits, &[want("bmc", "k2", 1)], &d)
            .await
            .unwrap()
            .unwrap();
        assert!(
            holders(&store)
                .await
                .contains(&("bmc".into(), "k2".into(), 0, d.action))
        );
        // A retry of b (attempt 2) claims again over its own earlier hold.
        let retry = Holder {
            attempt: 2,
            ..b.clone()
        };
        std::mem::forget(held_b);
        let again = claim(&store, &limits, &both, &retry)
            .await
            .unwrap()
            .unwrap();
        let rows = holders(&store).await;
        assert_eq!(
            rows.iter().filter(|h| h.3 == b.action).count(),
            2,
            "{rows:?}"
        );
        drop((again, held_d));
    }

    /// What `troupe kinds` shows of a limit: the max every key gets, and
    /// the keys an operator gave one of their own.
    #[test]
    fn maxes_show_the_operators_settings_over_the_manifests() {
        let limits = Limits::new(
            &[
                "power=50".parse().unwrap(),
                "power:dc1=5".parse().unwrap(),
                "bmc:https://10.0.0.5=2".parse().unwrap(),
            ],
            false,
        );
        let def = |max| LimitDef {
            description: String::new(),
            max,
        };
        assert_eq!(limits.maxes("power", &def(20)), (50, vec!["dc1=5".into()]));
        assert_eq!(
            limits.maxes("bmc", &def(1)),
            (1, vec!["https://10.0.0.5=2".into()])
        );
        assert_eq!(limits.maxes("site", &def(3)), (3, vec![]));
    }

    /// A setting no bundle declares is named, once, however many keys it
    /// sets; a declared one is not.
    #[test]
    fn settings_no_bundle_declares_are_named() {
        let limits = Limits::new(
            &[
                "power=50".parse().unwrap(),
                "powr:dc1=5".parse().unwrap(),
                "powr:dc2=5".parse().unwrap(),
                "bmc=2".parse().unwrap(),
            ],
            false,
        );
        let declared = BTreeSet::from(["power", "bmc", "site"]);
        assert_eq!(limits.undeclared(&declared), BTreeSet::from(["powr"]));
        assert_eq!(
            limits.undeclared(&BTreeSet::new()),
            BTreeSet::from(["bmc", "power", "powr"])
        );
    }

    /// The map of whom to wake stays as small as the keys in use: past
    /// 1,024 keys, those nobody waits on or holds are forgotten.
    #[test]
    fn the_wake_map_forgets_keys_nobody_uses() {
        let limits = Limits::new(&[], false);
        let kept = limits.queue("bmc", "held");
        for i in 0..1100 {
            limits.queue("bmc", &format!("k{i}"));
        }
        // 1,024 keys when k1023 came: all but the held one went.
        assert_eq!(limits.waiting.lock().unwrap().len(), 2 + 1099 - 1023);
        assert!(Arc::ptr_eq(&kept, &limits.queue("bmc", "held")));
    }

    #[test]
    fn long_keys_are_stored_by_digest() {
        let short = Want {
            name: "bmc".into(),
            key: "k".repeat(MAX_STORED_KEY),
            max: 1,
        };
        assert_eq!(short.stored(), short.key);
        let long = Want {
            name: "bmc".into(),
            key: "k".repeat(MAX_STORED_KEY + 1),
            max: 1,
        };
        assert!(long.stored().starts_with("sha256:") && long.stored().len() == 71);
        assert_ne!(
            long.stored(),
            Want {
                key: "j".repeat(300),
                ..long.clone()
            }
            .stored()
        );
    }
}
