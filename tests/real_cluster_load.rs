//! 20 agents against the real apiserver, first with no foreign PVs, then
//! (restarted) with 20,000 PVs of 100 other nodes in etcd: what each agent
//! holds and asks for must not grow with PVs that are not its own. The
//! figures are printed; `cargo bench --bench load` (LOAD_BENCH_ONLY=real)
//! prints them over a longer window.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::load::{mean, Fig};
use support::skip_unless_root;

const AGENTS: usize = 20;
const FOREIGN: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_agents_hold_and_ask_the_same_with_twenty_thousand_foreign_pvs() {
    if skip_unless_root("twenty_agents_hold_and_ask_the_same_with_twenty_thousand_foreign_pvs") {
        return;
    }
    let r = support::load::run(AGENTS, FOREIGN, Duration::from_secs(20)).await;
    let row = |what: &str, f: &dyn Fn(&Fig) -> f64| {
        let (b, l) = (mean(&r.base, f), mean(&r.loaded, f));
        eprintln!("{what:<28} {b:9.2} {l:9.2}   ratio {:.2}", l / b);
        l / b
    };
    eprintln!(
        "{AGENTS} agents; {FOREIGN} foreign PVs created in {:.1} s; means over the agents, 0 vs {FOREIGN} foreign",
        r.seed_s
    );
    let rss = row("RSS, MiB", &|f| f.rss_mib);
    let hwm = row("RSS peak (VmHWM), MiB", &|f| f.hwm_mib);
    let rpp = row("requests per pass", &|f| f.requests_per_pass());
    row("requests in the window", &|f| f.requests() as f64);
    let ready = row("restart -> ready, s", &|f| f.ready_s);
    for (phase, v) in [("0", &r.base), ("foreign", &r.loaded)] {
        let mut all = std::collections::BTreeMap::<&str, usize>::new();
        for f in v.iter() {
            for (k, n) in &f.kinds {
                *all.entry(k.as_str()).or_insert(0) += n;
            }
        }
        eprintln!("requests in the window ({phase}): {all:?}");
    }
    // Each agent lists and watches only its own node's PVs: the server
    // filters, so nothing of the foreign PVs reaches it.
    assert!(
        r.unscoped.is_empty(),
        "PV lists or watches without the node's selector: {:#?}",
        r.unscoped
    );
    assert!(r.refused.is_empty(), "requests refused: {:#?}", r.refused);
    eprintln!("requests that failed on the server: {:#?}", r.failed);
    for f in r.base.iter().chain(&r.loaded) {
        assert!(
            f.passes >= 1.0,
            "{}: no reconcile pass in the window: {f:?}",
            f.node
        );
    }
    // 20,000 PVs held in memory would be tens of MiB per agent (the whole
    // agent is about 20); a request per PV, or a relist, multiplies the rate.
    assert!(rss < 1.25, "RSS grew with the foreign PVs: x{rss:.2}");
    assert!(hwm < 1.25, "peak RSS grew with the foreign PVs: x{hwm:.2}");
    assert!(
        rpp < 1.25,
        "requests per pass grew with the foreign PVs: x{rpp:.2}"
    );
    // The apiserver filters by label from its watch cache: a restart takes
    // no longer for PVs the agent never sees.
    assert!(
        ready < 2.0,
        "a restart took x{ready:.2} as long with the foreign PVs"
    );
}
