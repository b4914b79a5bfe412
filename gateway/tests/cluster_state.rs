//! The cluster's shared state on a real PostgreSQL server (started by the test, as the
//! unprivileged `postgres` user when the test runs as root): migrations, replica liveness,
//! command leases and their fence, the event feed's ordering, presence.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPool;
use tether_gateway::cluster::db::{self, DbError};
use tether_gateway::cluster::events::{self, EventKind};
use tether_gateway::cluster::lease::{self, FenceError};
use tether_gateway::cluster::replica::{self, Liveness, Replica};
use tether_gateway::config::StoreConfig;
use tether_gateway::tools::local_postgres::{LocalPostgres, LocalPostgresOptions};

fn server() -> LocalPostgres {
    LocalPostgres::start(LocalPostgresOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn store(pg: &LocalPostgres) -> StoreConfig {
    StoreConfig {
        dsn: Some(pg.dsn()),
        connect_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

async fn pool(pg: &LocalPostgres) -> PgPool {
    let pool = db::connect(&store(pg)).await.unwrap();
    db::migrate(&pool).await.unwrap();
    pool
}

/// Waits for `cond` (checked every 20 ms) up to `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_migrate_concurrently_once_and_a_newer_schema_is_refused_naming_both_versions() {
    let pg = server();
    let cfg = store(&pg);
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let pool = db::connect(&cfg).await.unwrap();
                db::migrate(&pool).await.map(|_| pool)
            })
        })
        .collect();
    let mut pools = Vec::new();
    for r in runs {
        pools.push(r.await.unwrap().unwrap());
    }
    assert_eq!(
        db::applied_version(&pools[0]).await.unwrap(),
        db::schema_version()
    );
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pools[0])
        .await
        .unwrap();
    assert_eq!(applied, db::schema_version(), "each migration applied once");
    // A newer binary migrated this database.
    let newer = db::schema_version() + 7;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from the future', true, '\\x00', 1)",
    )
    .bind(newer)
    .execute(&pools[0])
    .await
    .unwrap();
    let e = db::migrate(&pools[0]).await.unwrap_err();
    assert!(
        matches!(e, DbError::SchemaTooNew { database, binary, .. }
        if database == newer && binary == db::schema_version()),
        "{e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&newer.to_string()) && msg.contains(&db::schema_version().to_string()),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_and_a_missing_database_are_config_errors_and_a_dead_server_times_out() {
    let pg = server();
    let mut cfg = store(&pg);
    cfg.dsn = Some(pg.dsn().replace(pg.password(), "wrong-password"));
    let e = db::connect(&cfg).await.unwrap_err();
    assert!(e.is_config(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("store.dsn") && msg.contains("refused user"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong-password"),
        "the password leaked: {msg}"
    );

    cfg.dsn = Some(pg.dsn().replace("/tether", "/no_such_db"));
    let e = db::connect(&cfg).await.unwrap_err();
    assert!(e.is_config() && e.to_string().contains("no_such_db"), "{e}");

    // Nothing listens there: start-up gives up after store.connect_timeout, naming it.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    cfg.dsn = Some(format!("postgres://tether:x@127.0.0.1:{port}/tether"));
    cfg.connect_timeout = Duration::from_millis(600);
    let e = db::connect(&cfg).await.unwrap_err();
    assert!(!e.is_config(), "{e}");
    assert!(e.to_string().contains("store.connect_timeout"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_alive_while_it_renews_and_a_second_process_of_the_same_name_supersedes_it() {
    let pg = server();
    let pool = pool(&pg).await;
    let timeout = Duration::from_millis(900);
    let a = Replica::register(pool.clone(), "gw-a", "gw-a:7445", timeout / 3, timeout)
        .await
        .unwrap();
    let stop = tether_runtime::CancellationToken::new();
    tokio::spawn(a.clone().run(stop.clone()));
    let b = Replica::register(pool.clone(), "gw-b", "gw-b:7445", timeout / 3, timeout)
        .await
        .unwrap();
    // gw-b does not renew: it expires by the database's clock, and fences itself.
    until(Duration::from_secs(10), "gw-b to expire", || async {
        let rows = replica::replicas(&pool).await.unwrap();
        rows.iter().any(|r| r.replica_id == "gw-b" && !r.alive)
            && rows.iter().any(|r| r.replica_id == "gw-a" && r.alive)
    })
    .await;
    assert!(!b.is_live(), "a replica that cannot renew knows it is dead");
    assert!(a.is_live());
    // The same name again: the next epoch, and the old process is superseded.
    let a2 = Replica::register(pool.clone(), "gw-a", "gw-a:7445", timeout / 3, timeout)
        .await
        .unwrap();
    assert_eq!(a2.id().epoch, a.id().epoch + 1);
    let mut w = a.watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        w.wait_for(|l| *l == Liveness::Superseded),
    )
    .await
    .expect("superseded within 10 s")
    .unwrap();
    assert!(!a.is_live());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_a_lease_until_it_dies_then_the_taker_fences_it() {
    let pg = server();
    let pool = pool(&pg).await;
    let timeout = Duration::from_millis(900);
    let a = Replica::register(pool.clone(), "gw-a", "a:1", timeout / 3, timeout)
        .await
        .unwrap();
    let b = Replica::register(pool.clone(), "gw-b", "b:1", timeout / 3, timeout)
        .await
        .unwrap();
    let stop_b = tether_runtime::CancellationToken::new();
    tokio::spawn(b.clone().run(stop_b.clone()));
    let agent = "acme/eu-1";

    // Both race for a free lease: exactly one gets it.
    let (ra, rb) = tokio::join!(
        lease::acquire(&pool, a.id(), agent, "acme"),
        lease::acquire(&pool, b.id(), agent, "acme")
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.is_some() != rb.is_some(),
        "exactly one holder: {ra:?} {rb:?}"
    );
    // Make gw-a the holder for what follows (gw-b gives it back if it won).
    if let Some(l) = rb {
        assert_eq!(lease::release(&pool, b.id(), &[l]).await.unwrap(), 1);
    }
    let held = lease::acquire(&pool, a.id(), agent, "acme")
        .await
        .unwrap()
        .expect("free");
    assert_eq!(
        lease::acquire(&pool, a.id(), agent, "acme").await.unwrap(),
        Some(held.clone()),
        "the holder keeps its epoch"
    );
    assert_eq!(
        lease::acquire(&pool, b.id(), agent, "acme").await.unwrap(),
        None,
        "a live holder keeps it"
    );
    // The holder's writes pass its fence.
    let mut tx = pool.begin().await.unwrap();
    lease::fence(&mut tx, a.id(), &held).await.unwrap();
    tx.commit().await.unwrap();

    // gw-a stops renewing (it is not running its heartbeat): once it expired, gw-b takes over.
    let deadline = Instant::now() + Duration::from_secs(10);
    let taken = loop {
        if let Some(l) = lease::acquire(&pool, b.id(), agent, "acme").await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "gw-b never took the lease over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(taken.epoch, held.epoch + 1);
    // gw-a can still reach PostgreSQL, but its writes are refused.
    let mut tx = pool.begin().await.unwrap();
    let e = lease::fence(&mut tx, a.id(), &held).await.unwrap_err();
    assert!(matches!(e, FenceError::Lost { .. }), "{e}");
    drop(tx);
    let (holder, alive) = lease::holder(&pool, agent).await.unwrap().unwrap();
    assert_eq!((holder.name.as_str(), alive), ("gw-b", true));
    stop_b.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_waits_for_the_holders_fenced_write_to_commit() {
    let pg = server();
    let pool = pool(&pg).await;
    let timeout = Duration::from_millis(600);
    let a = Replica::register(pool.clone(), "gw-a", "a:1", timeout / 3, timeout)
        .await
        .unwrap();
    let b = Replica::register(
        pool.clone(),
        "gw-b",
        "b:1",
        timeout / 3,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let held = lease::acquire(&pool, a.id(), "t/x", "t")
        .await
        .unwrap()
        .unwrap();
    // gw-a writes under its fence and holds the transaction open...
    let mut tx = pool.begin().await.unwrap();
    lease::fence(&mut tx, a.id(), &held).await.unwrap();
    // ...while it expires; gw-b's take-over must wait for that write.
    until(Duration::from_secs(10), "gw-a to expire", || async {
        replica::replicas(&pool)
            .await
            .unwrap()
            .iter()
            .any(|r| r.replica_id == "gw-a" && !r.alive)
    })
    .await;
    let (pool2, bid) = (pool.clone(), b.id().clone());
    let take = tokio::spawn(async move { lease::acquire(&pool2, &bid, "t/x", "t").await });
    // The taker is blocked on gw-a's row lock: it shows in pg_locks as waiting.
    until(
        Duration::from_secs(10),
        "the take-over to wait on the lock",
        || async {
            let waiting: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            waiting > 0
        },
    )
    .await;
    assert!(!take.is_finished());
    tx.commit().await.unwrap();
    let taken = take
        .await
        .unwrap()
        .unwrap()
        .expect("taken once gw-a committed");
    assert_eq!(taken.epoch, held.epoch + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_never_skips_a_row_committed_after_a_later_one() {
    let pg = server();
    let pool = pool(&pg).await;
    let start = events::now(&pool).await.unwrap();
    // tx1 appends first but commits last.
    let mut tx1 = pool.begin().await.unwrap();
    events::append(&mut tx1, EventKind::Lease, "t/first", b"1")
        .await
        .unwrap();
    let mut tx2 = pool.begin().await.unwrap();
    events::append(&mut tx2, EventKind::Lease, "t/second", b"2")
        .await
        .unwrap();
    tx2.commit().await.unwrap();
    // While tx1 runs, nothing after it can be read, tx2's row included.
    assert!(events::read(&pool, start).await.unwrap().is_empty());
    tx1.commit().await.unwrap();
    let read = events::read(&pool, start).await.unwrap();
    let agents: Vec<String> = read
        .iter()
        .map(|(_, e)| e.as_ref().unwrap().agent.clone())
        .collect();
    assert_eq!(agents, ["t/first", "t/second"]);
    // Read from the last position: nothing twice.
    let last = read.last().unwrap().0;
    assert!(events::read(&pool, last).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_delivers_every_event_to_every_replica_in_one_order() {
    let pg = server();
    let pool = pool(&pg).await;
    let stop = tether_runtime::CancellationToken::new();
    let feeds = [
        events::EventFeed::start(pool.clone(), stop.clone())
            .await
            .unwrap(),
        events::EventFeed::start(pool.clone(), stop.clone())
            .await
            .unwrap(),
    ];
    let mut subs: Vec<_> = feeds.iter().map(|f| f.subscribe()).collect();
    // 4 writers × 50 transactions, concurrently.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    let mut tx = pool.begin().await.unwrap();
                    events::append(&mut tx, EventKind::Lease, &format!("t/w{w}-{i}"), b"")
                        .await
                        .unwrap();
                    events::notify(&mut tx).await.unwrap();
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let mut orders = Vec::new();
    for sub in &mut subs {
        let mut got = Vec::new();
        while got.len() < 200 {
            match tokio::time::timeout(Duration::from_secs(20), sub.recv()).await {
                Ok(Ok(events::FeedItem::Event(e))) => got.push(e.agent.clone()),
                other => panic!("after {} events: {other:?}", got.len()),
            }
        }
        let mut distinct = got.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 200, "every event once");
        orders.push(got);
    }
    assert_eq!(orders[0], orders[1], "one order for every replica");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_replica_count_only_while_it_is_alive() {
    use tether_api::v1;
    let pg = server();
    let pool = pool(&pg).await;
    let stop = tether_runtime::CancellationToken::new();
    let feed = events::EventFeed::start(pool.clone(), stop.clone())
        .await
        .unwrap();
    let mut sub = feed.subscribe();
    let timeout = Duration::from_millis(900);
    let a = Replica::register(pool.clone(), "gw-a", "a:1", timeout / 3, timeout)
        .await
        .unwrap();
    let presence =
        tether_gateway::cluster::presence::Presence::start(a.clone(), feed.clone(), stop.clone());
    let session = |id: &str| v1::Session {
        session_id: id.into(),
        agent: "acme/eu-1".into(),
        connected_at: Some(std::time::SystemTime::now().into()),
        ..Default::default()
    };
    presence.up(session("s1"));
    presence.up(session("s2"));
    presence.down(session("s1"), "REPLACED".into());
    let filter = tether_gateway::cluster::presence::SessionFilter {
        agent: Some("acme/eu-1".into()),
        ..Default::default()
    };
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(10), sub.recv()).await {
            Ok(Ok(events::FeedItem::Event(e))) => seen.push(e.kind),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            EventKind::SessionUp,
            EventKind::SessionUp,
            EventKind::SessionDown
        ]
    );
    let live = tether_gateway::cluster::presence::sessions(&pool, &filter)
        .await
        .unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(
        (live[0].session_id.as_str(), live[0].replica.as_str()),
        ("s2", "gw-a")
    );
    // gw-a does not renew: its session no longer counts, though its row is still there.
    until(
        Duration::from_secs(10),
        "gw-a's sessions to stop counting",
        || async {
            tether_gateway::cluster::presence::sessions(&pool, &filter)
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    let agents = tether_gateway::cluster::presence::agents(&pool, &filter)
        .await
        .unwrap();
    assert_eq!(agents.len(), 1, "the agent stays known, offline");
    stop.cancel();
}

mod identity {
    use super::*;
    use tether_gateway::cluster::identity as pgid;
    use tether_gateway::identity::db::{RedeemError, TokenRecord, TokenRefusal, TokenState};

    fn token(agent: &str, created_ms: i64) -> TokenRecord {
        TokenRecord {
            agent: agent.into(),
            created_ms,
            expires_ms: created_ms + 3_600_000,
            state: TokenState::Pending,
            changed_ms: None,
            created_by: "test".into(),
            certificate: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_redeemed_at_two_replicas_at_once_issues_one_certificate() {
        let pg = server();
        let (a, b) = (pool(&pg).await, pool(&pg).await);
        let now = 1_700_000_000_000;
        for i in 0..20 {
            let hash = format!("h{i}");
            pgid::put_token(&a, &hash, &token("acme/eu-1", now), 64)
                .await
                .unwrap()
                .unwrap();
            let issued = std::sync::atomic::AtomicU32::new(0);
            let issue = |_: &TokenRecord| {
                issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, String>(((), "fp".to_owned()))
            };
            let (ra, rb) = tokio::join!(
                pgid::redeem_token(&a, &hash, now + 1, issue),
                pgid::redeem_token(&b, &hash, now + 1, issue)
            );
            let outcomes = [ra.unwrap(), rb.unwrap()];
            let won = outcomes.iter().filter(|o| o.is_ok()).count();
            assert_eq!(won, 1, "round {i}: {outcomes:?}");
            assert!(
                outcomes
                    .iter()
                    .any(|o| matches!(o, Err(RedeemError::Refused(TokenRefusal::Used))))
            );
            assert_eq!(issued.load(std::sync::atomic::Ordering::SeqCst), 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pending_token_cap_holds_across_replicas_and_a_revocation_voids_them_with_an_event()
    {
        let pg = server();
        let (a, b) = (pool(&pg).await, pool(&pg).await);
        let now = 1_700_000_000_000;
        let tries: Vec<_> = (0..12)
            .map(|i| {
                let p = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move {
                    pgid::put_token(&p, &format!("t{i}"), &token("acme/eu-2", now), 4)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut stored = 0;
        for t in tries {
            stored += usize::from(t.await.unwrap().is_ok());
        }
        assert_eq!(stored, 4, "the cap holds whatever replica creates");
        assert!(pgid::knows_agent(&a, "acme/eu-2").await.unwrap());
        assert!(!pgid::knows_agent(&a, "acme/none").await.unwrap());

        let start = events::now(&a).await.unwrap();
        let agent: tunnel_proto::AgentId = "acme/eu-2".parse().unwrap();
        let (record, voided) = pgid::revoke(&b, &agent, "key leaked", Vec::new(), now + 5)
            .await
            .unwrap();
        assert_eq!(voided, 4);
        assert_eq!(record.reason, "key leaked");
        let seen = events::read(&a, start).await.unwrap();
        assert!(seen.iter().any(|(_, e)| {
            e.as_ref()
                .is_some_and(|e| e.kind == EventKind::Revocation && e.agent == "acme/eu-2")
        }));
        let all = pgid::load(&a).await.unwrap();
        assert_eq!(all.agents.len(), 1);
        let r = pgid::redeem_token(&a, "t0", now + 6, |_| Ok::<_, ()>(((), String::new())))
            .await
            .unwrap();
        assert!(
            matches!(r, Err(RedeemError::Refused(TokenRefusal::Revoked(_))))
                || matches!(r, Err(RedeemError::Refused(TokenRefusal::Unknown))),
            "a voided token is refused"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_is_renewed_at_most_once_a_second_across_replicas() {
        let pg = server();
        let (a, b) = (pool(&pg).await, pool(&pg).await);
        let t = 1_700_000_000_000;
        assert!(pgid::take_renewal(&a, "acme/x", t, 1000).await.unwrap());
        assert!(
            !pgid::take_renewal(&b, "acme/x", t + 500, 1000)
                .await
                .unwrap()
        );
        assert!(
            pgid::take_renewal(&b, "acme/y", t + 500, 1000)
                .await
                .unwrap()
        );
        assert!(
            pgid::take_renewal(&b, "acme/x", t + 1000, 1000)
                .await
                .unwrap()
        );
    }
}

mod commands {
    use super::*;
    use tether_gateway::cluster::commands::{self as pgc, Submitted, Write, Written};
    use tether_gateway::commands::{CommandRecord, CommandState, NewCommand};

    fn new_cmd(id: &str, agent: &str, key: &str) -> CommandRecord {
        let mut c = CommandRecord::queued(
            NewCommand {
                agent: agent.parse().unwrap(),
                kind: "echo".into(),
                payload: bytes::Bytes::from_static(b"hello"),
                content_type: String::new(),
                idempotency_key: key.into(),
                ordering_key: String::new(),
                ttl: None,
                trace_context: Default::default(),
            },
            std::time::SystemTime::now(),
            None,
        );
        c.id = id.into();
        c.version = 1;
        c
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_idempotency_key_through_three_replicas_at_once_is_one_command() {
        let pg = server();
        let pools = [pool(&pg).await, pool(&pg).await, pool(&pg).await];
        for round in 0..10 {
            let key = format!("k{round}");
            let tries: Vec<_> = (0..3)
                .map(|r| {
                    let (p, key) = (pools[r].clone(), key.clone());
                    tokio::spawn(async move {
                        pgc::submit(
                            &p,
                            &new_cmd(&format!("c{round}-{r}"), "acme/eu-1", &key),
                            100,
                        )
                        .await
                        .unwrap()
                    })
                })
                .collect();
            let mut created = Vec::new();
            let mut ids = Vec::new();
            for t in tries {
                match t.await.unwrap() {
                    Submitted::Created(c) => {
                        ids.push(c.id.clone());
                        created.push(c.id)
                    }
                    Submitted::Existing(c) => ids.push(c.id),
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(created.len(), 1, "round {round}: {ids:?}");
            assert!(
                ids.iter().all(|i| *i == created[0]),
                "every caller gets the one id"
            );
        }
        let all = pgc::list(
            &pools[0],
            &pgc::ListQuery {
                agent: Some("acme/eu-1".parse().unwrap()),
                limit: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(all.len(), 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pending_limit_holds_across_replicas() {
        let pg = server();
        let (a, b) = (pool(&pg).await, pool(&pg).await);
        let tries: Vec<_> = (0..20)
            .map(|i| {
                let p = if i % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(async move {
                    pgc::submit(&p, &new_cmd(&format!("c{i}"), "acme/eu-1", ""), 7)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut stored = 0;
        for t in tries {
            if let Submitted::Created(_) = t.await.unwrap() {
                stored += 1;
            }
        }
        assert_eq!(stored, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_holders_writes_are_fenced_after_a_take_over_and_never_undo_a_cancel() {
        let pg = server();
        let pool = pool(&pg).await;
        let timeout = Duration::from_millis(900);
        let a = Replica::register(pool.clone(), "gw-a", "a:1", timeout / 3, timeout)
            .await
            .unwrap();
        let b = Replica::register(
            pool.clone(),
            "gw-b",
            "b:1",
            timeout / 3,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let agent = "acme/eu-1";
        for i in 0..3 {
            let Submitted::Created(_) =
                pgc::submit(&pool, &new_cmd(&format!("c{i}"), agent, ""), 100)
                    .await
                    .unwrap()
            else {
                panic!()
            };
        }
        let lease_a = lease::acquire(&pool, a.id(), agent, "acme")
            .await
            .unwrap()
            .unwrap();
        let queued = pgc::unfinished(&pool, &agent.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(
            queued.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["c0", "c1", "c2"],
            "in submission order, with payloads"
        );
        assert_eq!(&queued[0].payload[..], b"hello");
        let delivered = |c: &CommandRecord| {
            let mut d = c.clone();
            d.state = CommandState::Delivered;
            d.version += 1;
            Write { record: d }
        };
        // c0 delivered; c1 cancelled first, so its delivery write conflicts.
        let now = std::time::SystemTime::now();
        assert!(pgc::cancel(&pool, "c1", now).await.unwrap().is_ok());
        let w = pgc::write(
            &pool,
            a.id(),
            &lease_a,
            &[delivered(&queued[0]), delivered(&queued[1])],
        )
        .await
        .unwrap();
        assert_eq!(w, [Written::Ok, Written::Conflict]);
        assert_eq!(
            pgc::get(&pool, "c1").await.unwrap().unwrap().state,
            CommandState::Cancelled,
            "the cancel is not undone"
        );
        // Too late to cancel c0.
        assert!(pgc::cancel(&pool, "c0", now).await.unwrap().is_err());
        // gw-a expires; gw-b takes the lease; gw-a's next write is fenced.
        let deadline = Instant::now() + Duration::from_secs(10);
        let lease_b = loop {
            if let Some(l) = lease::acquire(&pool, b.id(), agent, "acme").await.unwrap() {
                break l;
            }
            assert!(Instant::now() < deadline, "no take-over");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let w = pgc::write(&pool, a.id(), &lease_a, &[delivered(&queued[2])])
            .await
            .unwrap();
        assert_eq!(w, [Written::Fenced]);
        let w = pgc::write(&pool, b.id(), &lease_b, &[delivered(&queued[2])])
            .await
            .unwrap();
        assert_eq!(w, [Written::Ok]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_commands_expire_once_and_finished_ones_are_pruned_by_age_and_count() {
        let pg = server();
        let pool = pool(&pg).await;
        let past = std::time::SystemTime::now() - Duration::from_secs(5);
        for i in 0..5 {
            let mut c = new_cmd(&format!("e{i}"), "acme/eu-1", "");
            c.expires = Some(past);
            pgc::submit(&pool, &c, 100).await.unwrap();
        }
        pgc::submit(&pool, &new_cmd("keep", "acme/eu-1", ""), 100)
            .await
            .unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let (x, y) = tokio::join!(
            pgc::expire_due(&pool, now_ms, 100),
            pgc::expire_due(&pool, now_ms, 100)
        );
        assert_eq!(x.unwrap().len() + y.unwrap().len(), 5, "each expires once");
        let agent = "acme/eu-1".parse().unwrap();
        assert_eq!(pgc::unfinished(&pool, &agent).await.unwrap().len(), 1);
        // Keep 2 of the 5 finished: 3 go, the oldest first.
        assert_eq!(pgc::prune(&pool, 0, 2, 100).await.unwrap(), 3);
        // Everything finished before the far future goes.
        assert_eq!(pgc::prune(&pool, i64::MAX, 1000, 100).await.unwrap(), 2);
        assert!(pgc::get(&pool, "keep").await.unwrap().is_some());
        assert!(pgc::get(&pool, "e0").await.unwrap().is_none());
    }
}
