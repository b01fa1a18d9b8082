//! Bases from PostgreSQL: read whole in one snapshot and installed, and the store of another
//! fleet replaced by this fleet's latest base.

use super::*;

/// Reads base `seq` from PostgreSQL, header and rows in one consistent snapshot, and
/// installs it; with `replace`, over a store that belongs to another fleet (any number).
pub(super) async fn install_base(
    inner: &Inner,
    client: &Client,
    seq: u32,
    in_commit: bool,
    replace: bool,
) -> Result<(), FleetError> {
    let t0 = Instant::now();
    let err = db_err(&inner.pg);
    if !in_commit {
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(&err)?;
    }
    let read = read_base_whole(inner, client, seq).await;
    if !in_commit {
        let end = if read.is_ok() { "COMMIT" } else { "ROLLBACK" };
        client.batch_execute(end).await.map_err(&err)?;
    }
    let (at, source, committed, rows) = read?;
    let fetched = t0.elapsed();
    let dir = inner.directory.clone();
    let what = format!("fleet base {seq}");
    let built = tokio::task::spawn_blocking(move || {
        let t1 = Instant::now();
        let base = Base::from_rows(&rows, dir.states(), &what)?;
        let built = t1.elapsed();
        drop(rows);
        if replace {
            dir.replace_base(&at, base, &source)?;
        } else {
            dir.install_base(&at, base, &source)?;
        }
        Ok::<_, FleetError>(built)
    })
    .await
    .map_err(|e| FleetError::Refused(e.to_string()))??;
    info!(
        change = seq,
        ms = t0.elapsed().as_millis() as u64,
        fetch_ms = fetched.as_millis() as u64,
        build_ms = built.as_millis() as u64,
        "fleet: base loaded from PostgreSQL"
    );
    applied_now(inner, committed);
    Ok(())
}

/// Base `seq` whole: its header in the log (identity, source, commit time) and its rows,
/// which must be there, as many as the header says.
pub(super) async fn read_base_whole(
    inner: &Inner,
    client: &Client,
    seq: u32,
) -> Result<(Stamp, String, f64, Vec<BaseRow>), FleetError> {
    let s = inner.schema();
    let head = client
        .query_opt(
            &format!(
                r#"SELECT source, extract(epoch FROM committed_at)::float8, rows, {}
                   FROM "{s}".changes WHERE seq = $1 AND kind = 'base'"#,
                sql::STAMP_COLUMNS
            ),
            &[&i64::from(seq)],
        )
        .await
        .map_err(db_err(&inner.pg))?
        .ok_or_else(|| FleetError::Sql(format!("base {seq} is no longer in the change log")))?;
    let rows = read_base(inner, client, seq).await?;
    let said: i64 = head.get(2);
    if rows.is_empty() || (said > 0 && i64::try_from(rows.len()).ok() != Some(said)) {
        return Err(FleetError::Sql(format!(
            "base {seq}: the change log says {said} rows, base_rows holds {}: not installed (import a known-good directory file as a new base)",
            rows.len()
        )));
    }
    Ok((sql::stamp(seq, &head, 3), head.get(0), head.get(1), rows))
}

/// Replaces a store that belongs to another fleet with this fleet's latest base; until the
/// fleet has one the node stays behind.
pub(super) async fn replace_store(
    inner: &Inner,
    client: &Client,
    in_commit: bool,
) -> Result<(), FleetError> {
    let s = inner.schema();
    let base: Option<i64> = client
        .query_one(
            &format!(r#"SELECT max(seq) FROM "{s}".changes WHERE kind = 'base'"#),
            &[],
        )
        .await
        .map_err(db_err(&inner.pg))?
        .get(0);
    let Some(b) = base else {
        return Err(FleetError::Refused(
            "the local directory belongs to another fleet, and this fleet has no base yet".into(),
        ));
    };
    install_base(inner, client, seq_u32(b)?, in_commit, true).await?;
    let id = inner
        .fleet_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let dir = inner.store_dir.clone();
    super::super::commit::blocking(move || super::super::write_marker(&dir, &id)).await??;
    inner.replace.store(false, Ordering::SeqCst);
    inner.converged();
    info!(
        base = b,
        "fleet: the local directory store now belongs to this fleet"
    );
    Ok(())
}

/// Takes fleet id `id` (as PostgreSQL has it) for this node's store: on a match nothing
/// changes; a store without a marker is claimed; a store of another fleet (the schema was
/// made again while this node was away) is replaced by this fleet's latest base at the next
/// catch-up. True when the store has no marker yet: the caller writes it, then takes `id`.
pub(super) fn adopt_fleet(inner: &Inner, id: &str) -> bool {
    let mut known = inner.fleet_id.lock().unwrap_or_else(|p| p.into_inner());
    match known.as_deref() {
        Some(k) if k == id => return false,
        Some(k) => {
            warn!(old = k, new = id, "fleet: the local directory store belongs to another fleet (the schema was made again?); replacing it with this fleet's latest base");
            inner.replace.store(true, Ordering::SeqCst);
            inner.mark_behind("the local directory belongs to another fleet; loading this fleet's");
        }
        None => return true,
    }
    *known = Some(id.to_string());
    false
}

/// The rows of base `seq` (COPY out as CSV), primaries first.
pub(super) async fn read_base(
    inner: &Inner,
    client: &Client,
    seq: u32,
) -> Result<Vec<BaseRow>, FleetError> {
    let err = db_err(&inner.pg);
    let stream = client
        .copy_out(&format!(
            r#"COPY (SELECT address, mailbox, state, file_state, origin, routing_address FROM "{}".base_rows WHERE seq = {seq}) TO STDOUT (FORMAT csv)"#,
            inner.schema()
        ))
        .await
        .map_err(&err)?;
    let mut stream = std::pin::pin!(stream);
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.map_err(&err)?);
    }
    let mut primaries = Vec::new();
    let mut aliases = Vec::new();
    let mut rd = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(data.as_slice());
    for rec in rd.records() {
        let rec = rec.map_err(|source| FleetError::BaseCsv { seq, source })?;
        let field = |i: usize| rec.get(i).unwrap_or_default().to_string();
        let row = BaseRow {
            address: field(0),
            mailbox: field(1),
            state: field(2),
            file_state: field(3),
            origin: field(4)
                .parse()
                .map_err(|_| FleetError::Sql(format!("base {seq}: bad origin {:?}", field(4))))?,
            routing_address: field(5),
        };
        if row.address == row.mailbox {
            primaries.push(row);
        } else {
            aliases.push(row);
        }
    }
    if primaries.is_empty() && !aliases.is_empty() {
        return Err(FleetError::Sql(format!(
            "base {seq}: rows without their mailboxes"
        )));
    }
    primaries.append(&mut aliases);
    Ok(primaries)
}
