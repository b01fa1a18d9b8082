//! The shadow leases (`[shadow]`): which node is alive, which survivor takes a dead node's
//! queue, and what it took. Kept in the fleet's PostgreSQL beside the nodes table, because
//! the decision must be made exactly once for the whole fleet.
//!
//! Tables (in `fleet.schema`, created by the first node that needs them):
//! - `shadow_leases`: one row per node; `renewed` is the time (PostgreSQL's clock) of its
//!   last renewal, `backlog` its messages with a live shadow copy.
//! - `shadow_claims`: one row per takeover: the dead `node`, the `taker`, `upto` (the
//!   stream sequence at the claim: copies stored later are not taken; the dead node keeps
//!   them), `done` once every copy is taken, `seen` once the dead node, back, has dropped
//!   what was taken.
//! - `shadow_taken`: every message taken (dead node, its queue id, the claim, the new id).
//!
//! Exactly one survivor: a claim is an `UPDATE` of the dead node's lease row whose `WHERE`
//! says the lease is older than `takeover_after`, no claim since its last renewal is open,
//! and the last claim since then is the one the survivor saw (`claimed_upto`, compare and
//! set); PostgreSQL re-checks that `WHERE` against the newest version of the row when two
//! updates meet, so of two survivors one updates the row and the other finds it changed.
//! A renewal updates the same row, so claim and renewal are serialized too: either the
//! claim is made first (and the renewal, in its transaction, reads it back), or the
//! renewal first (and the claim finds a fresh lease). A dead node that stored more copies
//! after a claim (it was cut off from PostgreSQL, not from NATS) is claimed again for
//! those. A claim whose taker dies in turn is taken on by another survivor when the
//! taker's lease expires, or cancelled by the node it claimed, if that one comes back.

pub use super::shadow_status::{LeaseRow, NodeShadow, ShadowStatus};
use super::sql::{self, db_err};
use super::{tls, Fleet, FleetError};
use std::collections::HashSet;
use std::time::Duration;
use tokio_postgres::Client;

/// A takeover of this node's queue, as its renewal reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimOnMe {
    /// The claim's id.
    pub id: i64,
    /// The survivor that takes (or took) the queue.
    pub taker: String,
    /// True when every copy has been taken.
    pub done: bool,
    /// The taker's own lease is older than `takeover_after` (it died in the middle).
    pub taker_stale: bool,
}

/// A dead node as a survivor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead {
    /// The node.
    pub node: String,
    /// The stream sequence of the last claim on it since its last renewal, if any: only
    /// copies stored after it are left to take.
    pub last_upto: Option<u64>,
}

/// A takeover this node makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The claim's id.
    pub id: i64,
    /// The dead node.
    pub node: String,
    /// Stream sequence at the claim: copies stored after it are not taken.
    pub upto: u64,
}

/// The leases of one node, on a connection of their own.
pub struct Leases {
    pg: tls::Pg,
    schema: String,
    node: String,
    after: Duration,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl Fleet {
    /// This node's shadow leases, a node with a lease older than `takeover_after` being
    /// dead for the fleet.
    pub fn leases(&self, takeover_after: Duration) -> Leases {
        Leases {
            pg: self.inner.pg.clone(),
            schema: self.inner.schema().to_string(),
            node: self.inner.cfg.node.clone(),
            after: takeover_after,
            client: tokio::sync::Mutex::new(None),
        }
    }
}

/// RFC 3339 text of a timestamptz column.
const AT: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS"Z"'"#;

fn ddl(s: &str) -> String {
    format!(
        r#"
CREATE TABLE IF NOT EXISTS "{s}".shadow_leases (
    node text PRIMARY KEY,
    renewed timestamptz NOT NULL DEFAULT clock_timestamp(),
    backlog bigint NOT NULL DEFAULT 0,
    claimed_at timestamptz,
    claimed_upto bigint,
    claim_open boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS "{s}".shadow_claims (
    id bigserial PRIMARY KEY,
    node text NOT NULL,
    taker text NOT NULL,
    upto bigint NOT NULL,
    claimed timestamptz NOT NULL DEFAULT clock_timestamp(),
    done timestamptz,
    taken bigint NOT NULL DEFAULT 0,
    seen boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS shadow_claims_node ON "{s}".shadow_claims (node);
CREATE TABLE IF NOT EXISTS "{s}".shadow_taken (
    node text NOT NULL,
    qid text NOT NULL,
    claim bigint NOT NULL,
    new_qid text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (node, qid)
);
CREATE INDEX IF NOT EXISTS shadow_taken_claim ON "{s}".shadow_taken (claim);
"#
    )
}

impl Leases {
    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `work` on the connection (made, and the tables created, when there is none),
    /// bounded by a quarter of `takeover_after`; a failed connection is dropped so the next
    /// call makes a new one.
    async fn with<T>(
        &self,
        work: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<T, FleetError>> + Send + 'c>,
        >,
    ) -> Result<T, FleetError> {
        let bound = (self.after / 4).max(Duration::from_secs(1));
        let mut slot = self.client.lock().await;
        let fut = async {
            if slot.as_ref().is_none_or(|c| c.is_closed()) {
                let c = sql::connect(&self.pg).await?;
                let s = &self.schema;
                c.batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock(hashtext('{}')); {} COMMIT;",
                    sql::lock_key(s, "migrate"),
                    ddl(s)
                ))
                .await
                .map_err(db_err(&self.pg))?;
                *slot = Some(c);
            }
            match slot.as_mut() {
                Some(c) => work(c).await,
                None => Err(FleetError::Unreachable {
                    target: super::target(&self.pg),
                    reason: "no connection".into(),
                }),
            }
        };
        let res = match tokio::time::timeout(bound, fut).await {
            Ok(r) => r,
            Err(_) => Err(FleetError::Unreachable {
                target: super::target(&self.pg),
                reason: format!("no answer within {} ms", bound.as_millis()),
            }),
        };
        // A broken connection is made again next time (a transaction a failed statement
        // left open is rolled back when its handle is dropped).
        if res.as_ref().is_err_and(|e| e.is_unreachable()) {
            *slot = None;
        }
        res
    }

    /// Renews this node's lease (reporting `backlog`) and reads back the takeovers of its
    /// queue it has not yet acted on.
    pub async fn renew(&self, backlog: u64) -> Result<Vec<ClaimOnMe>, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let backlog = i64::try_from(backlog).unwrap_or(i64::MAX);
        let after = self.after.as_secs_f64();
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let tx = c.transaction().await.map_err(&err)?;
                tx.execute(
                    &format!(
                        r#"INSERT INTO "{s}".shadow_leases (node, renewed, backlog) VALUES ($1, clock_timestamp(), $2)
                           ON CONFLICT (node) DO UPDATE SET renewed = excluded.renewed, backlog = excluded.backlog"#
                    ),
                    &[&me, &backlog],
                )
                .await
                .map_err(&err)?;
                let rows = tx
                    .query(
                        &format!(
                            r#"SELECT c.id, c.taker, c.done IS NOT NULL,
                                 coalesce(l.renewed < clock_timestamp() - make_interval(secs => $2), true)
                               FROM "{s}".shadow_claims c LEFT JOIN "{s}".shadow_leases l ON l.node = c.taker
                               WHERE c.node = $1 AND NOT c.seen AND c.taker <> $1 ORDER BY c.id"#
                        ),
                        &[&me, &after],
                    )
                    .await
                    .map_err(&err)?;
                tx.commit().await.map_err(&err)?;
                Ok(rows
                    .iter()
                    .map(|r| ClaimOnMe {
                        id: r.get(0),
                        taker: r.get(1),
                        done: r.get(2),
                        taker_stale: r.get(3),
                    })
                    .collect())
            })
        })
        .await
    }

    /// The queue ids taken by `claims` (this node's messages a survivor delivers now).
    pub async fn taken_in(&self, claims: &[i64]) -> Result<Vec<String>, FleetError> {
        let (s, pg, ids) = (self.schema.clone(), self.pg.clone(), claims.to_vec());
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(r#"SELECT qid FROM "{s}".shadow_taken WHERE claim = ANY($1)"#),
                        &[&ids],
                    )
                    .await
                    .map_err(db_err(&pg))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .await
    }

    /// Marks `claims` as acted on: this node has dropped what they took.
    pub async fn seen(&self, claims: &[i64]) -> Result<(), FleetError> {
        let (s, pg, ids) = (self.schema.clone(), self.pg.clone(), claims.to_vec());
        self.with(move |c| {
            Box::pin(async move {
                c.execute(
                    &format!(r#"UPDATE "{s}".shadow_claims SET seen = true WHERE id = ANY($1)"#),
                    &[&ids],
                )
                .await
                .map_err(db_err(&pg))?;
                Ok(())
            })
        })
        .await
    }

    /// Ends a claim on this node whose taker died before finishing it (this node is back:
    /// what the taker recorded is dropped here, the rest stays this node's). True when it
    /// was ended here.
    pub async fn cancel(&self, claim: i64) -> Result<bool, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let after = self.after.as_secs_f64();
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let tx = c.transaction().await.map_err(&err)?;
                let n = tx
                    .execute(
                        &format!(
                            r#"UPDATE "{s}".shadow_claims c SET done = clock_timestamp()
                               WHERE c.id = $1 AND c.node = $2 AND c.done IS NULL AND NOT EXISTS (
                                   SELECT 1 FROM "{s}".shadow_leases l WHERE l.node = c.taker
                                   AND l.renewed >= clock_timestamp() - make_interval(secs => $3))"#
                        ),
                        &[&claim, &me, &after],
                    )
                    .await
                    .map_err(&err)?;
                tx.execute(
                    &format!(
                        r#"UPDATE "{s}".shadow_leases SET claim_open = false WHERE node = $1"#
                    ),
                    &[&me],
                )
                .await
                .map_err(&err)?;
                tx.commit().await.map_err(&err)?;
                Ok(n == 1)
            })
        })
        .await
    }

    /// The claims this node has to carry out: its own unfinished ones (a restart in the
    /// middle of a takeover), and those whose taker died before finishing (taken on here).
    pub async fn open_claims(&self) -> Result<Vec<Claim>, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let after = self.after.as_secs_f64();
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let rows = c
                    .query(
                        &format!(
                            r#"UPDATE "{s}".shadow_claims c SET taker = $1
                               WHERE c.done IS NULL AND c.node <> $1 AND (c.taker = $1 OR EXISTS (
                                   SELECT 1 FROM "{s}".shadow_leases l WHERE l.node = c.taker
                                   AND l.renewed < clock_timestamp() - make_interval(secs => $2)))
                               RETURNING id, node, upto"#
                        ),
                        &[&me, &after],
                    )
                    .await
                    .map_err(&err)?;
                Ok(rows
                    .iter()
                    .map(|r| Claim {
                        id: r.get(0),
                        node: r.get(1),
                        upto: r.get::<_, i64>(2).max(0) as u64,
                    })
                    .collect())
            })
        })
        .await
    }

    /// Nodes whose lease is older than `takeover_after` and on which no claim is open, each
    /// with the stream sequence of the last claim on it since its last renewal.
    pub async fn dead(&self) -> Result<Vec<Dead>, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let after = self.after.as_secs_f64();
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(
                            r#"SELECT node, CASE WHEN claimed_at > renewed THEN claimed_upto END
                               FROM "{s}".shadow_leases
                               WHERE node <> $1 AND renewed < clock_timestamp() - make_interval(secs => $2)
                               AND NOT (claim_open AND claimed_at > renewed)
                               ORDER BY node"#
                        ),
                        &[&me, &after],
                    )
                    .await
                    .map_err(db_err(&pg))?;
                Ok(rows
                    .iter()
                    .map(|r| Dead {
                        node: r.get(0),
                        last_upto: r.get::<_, Option<i64>>(1).map(|u| u.max(0) as u64),
                    })
                    .collect())
            })
        })
        .await
    }

    /// Claims `dead`'s queue (copies up to stream sequence `upto`) if it is still dead, no
    /// claim on it is open, and the last claim on it since its renewal is still `prev` (the
    /// one the caller saw): `None` when another survivor claimed it or it renewed meanwhile.
    pub async fn claim(
        &self,
        dead: &str,
        upto: u64,
        prev: Option<u64>,
    ) -> Result<Option<Claim>, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let (dead, after) = (dead.to_string(), self.after.as_secs_f64());
        let upto_i = i64::try_from(upto).unwrap_or(i64::MAX);
        let prev_i = prev.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let tx = c.transaction().await.map_err(&err)?;
                // One UPDATE: its WHERE is checked again against the newest row version when
                // another survivor's claim (or the node's renewal) got there first.
                let won = tx
                    .query_opt(
                        &format!(
                            r#"UPDATE "{s}".shadow_leases
                               SET claimed_at = clock_timestamp(), claimed_upto = $3, claim_open = true
                               WHERE node = $1 AND renewed < clock_timestamp() - make_interval(secs => $2)
                               AND NOT (claim_open AND claimed_at > renewed)
                               AND (CASE WHEN claimed_at > renewed THEN claimed_upto END) IS NOT DISTINCT FROM $4
                               RETURNING node"#
                        ),
                        &[&dead, &after, &upto_i, &prev_i],
                    )
                    .await
                    .map_err(&err)?
                    .is_some();
                if !won {
                    tx.rollback().await.map_err(&err)?;
                    return Ok(None);
                }
                let id: i64 = tx
                    .query_one(
                        &format!(
                            r#"INSERT INTO "{s}".shadow_claims (node, taker, upto) VALUES ($1, $2, $3) RETURNING id"#
                        ),
                        &[&dead, &me, &upto_i],
                    )
                    .await
                    .map_err(&err)?
                    .get(0);
                tx.commit().await.map_err(&err)?;
                Ok(Some(Claim {
                    id,
                    node: dead,
                    upto,
                }))
            })
        })
        .await
    }

    /// Which of `qids` (messages of `node`) were taken already, by any claim.
    pub async fn already_taken(
        &self,
        node: &str,
        qids: &[String],
    ) -> Result<HashSet<String>, FleetError> {
        let (s, pg) = (self.schema.clone(), self.pg.clone());
        let (node, qids) = (node.to_string(), qids.to_vec());
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(
                            r#"SELECT qid FROM "{s}".shadow_taken WHERE node = $1 AND qid = ANY($2)"#
                        ),
                        &[&node, &qids],
                    )
                    .await
                    .map_err(db_err(&pg))?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })
        .await
    }

    /// Records messages taken by `claim`: (queue id on the dead node, new queue id here).
    /// False when the claim is no longer this node's (it was taken on by another survivor,
    /// or cancelled): nothing is recorded, and what was taken must be dropped here. A
    /// node's taking back of its own copies (`claim.id` 0) has no claim row.
    pub async fn record_taken(
        &self,
        claim: &Claim,
        rows: &[(String, String)],
    ) -> Result<bool, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let (node, id) = (claim.node.clone(), claim.id);
        let old: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let new: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let tx = c.transaction().await.map_err(&err)?;
                if id != 0 {
                    let ours = tx
                        .query_opt(
                            &format!(
                                r#"SELECT 1 FROM "{s}".shadow_claims WHERE id = $1 AND taker = $2 AND done IS NULL FOR UPDATE"#
                            ),
                            &[&id, &me],
                        )
                        .await
                        .map_err(&err)?
                        .is_some();
                    if !ours {
                        tx.rollback().await.map_err(&err)?;
                        return Ok(false);
                    }
                }
                tx.execute(
                    &format!(
                        r#"INSERT INTO "{s}".shadow_taken (node, qid, claim, new_qid)
                           SELECT $1, o, $2, n FROM unnest($3::text[], $4::text[]) AS t(o, n)
                           ON CONFLICT (node, qid) DO NOTHING"#
                    ),
                    &[&node, &id, &old, &new],
                )
                .await
                .map_err(&err)?;
                tx.commit().await.map_err(&err)?;
                Ok(true)
            })
        })
        .await
    }

    /// Marks `claim` done, `taken` messages taken by it. False when it was no longer this
    /// node's.
    pub async fn finish(&self, claim: &Claim, taken: u64) -> Result<bool, FleetError> {
        let (s, me, pg) = (self.schema.clone(), self.node.clone(), self.pg.clone());
        let (id, node) = (claim.id, claim.node.clone());
        let upto = i64::try_from(claim.upto).unwrap_or(i64::MAX);
        let taken = i64::try_from(taken).unwrap_or(i64::MAX);
        self.with(move |c| {
            Box::pin(async move {
                let err = db_err(&pg);
                let tx = c.transaction().await.map_err(&err)?;
                let n = tx
                    .execute(
                        &format!(
                            r#"UPDATE "{s}".shadow_claims SET done = clock_timestamp(), taken = taken + $3
                               WHERE id = $1 AND taker = $2 AND done IS NULL"#
                        ),
                        &[&id, &me, &taken],
                    )
                    .await
                    .map_err(&err)?;
                tx.execute(
                    &format!(
                        r#"UPDATE "{s}".shadow_leases SET claim_open = false WHERE node = $1 AND claimed_upto = $2"#
                    ),
                    &[&node, &upto],
                )
                .await
                .map_err(&err)?;
                tx.commit().await.map_err(&err)?;
                Ok(n == 1)
            })
        })
        .await
    }

    /// Every node's lease, with the last takeover of its queue and the last it made.
    pub async fn rows(&self) -> Result<Vec<LeaseRow>, FleetError> {
        let (s, pg) = (self.schema.clone(), self.pg.clone());
        self.with(move |c| {
            Box::pin(async move {
                let rows = c
                    .query(
                        &format!(
                            r#"SELECT l.node, l.backlog, extract(epoch FROM clock_timestamp() - l.renewed)::float8,
                                 o.taker, to_char(o.claimed AT TIME ZONE 'UTC', {AT}), o.taken, o.done IS NOT NULL,
                                 t.node, to_char(t.claimed AT TIME ZONE 'UTC', {AT}), t.taken
                               FROM "{s}".shadow_leases l
                               LEFT JOIN LATERAL (SELECT * FROM "{s}".shadow_claims c WHERE c.node = l.node
                                                  ORDER BY id DESC LIMIT 1) o ON true
                               LEFT JOIN LATERAL (SELECT * FROM "{s}".shadow_claims c WHERE c.taker = l.node
                                                  AND c.node <> l.node ORDER BY id DESC LIMIT 1) t ON true
                               ORDER BY l.node"#
                        ),
                        &[],
                    )
                    .await
                    .map_err(db_err(&pg))?;
                Ok(rows
                    .iter()
                    .map(|r| LeaseRow {
                        node: r.get(0),
                        backlog: r.get::<_, i64>(1).max(0) as u64,
                        age_seconds: r.get(2),
                        taken_over: r.get::<_, Option<String>>(3).map(|taker| {
                            (
                                taker,
                                r.get::<_, Option<String>>(4).unwrap_or_default(),
                                r.get::<_, i64>(5).max(0) as u64,
                                r.get(6),
                            )
                        }),
                        took: r.get::<_, Option<String>>(7).map(|n| {
                            (
                                n,
                                r.get::<_, Option<String>>(8).unwrap_or_default(),
                                r.get::<_, Option<i64>>(9).unwrap_or(0).max(0) as u64,
                            )
                        }),
                    })
                    .collect())
            })
        })
        .await
    }
}
