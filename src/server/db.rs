//! One connection to the store's database, SQLite or PostgreSQL, behind one
//! small interface, so the store, history reads and retention write each
//! query once.
//!
//! SQL is written with SQLite's numbered placeholders (`?1`, `?2`…), which
//! go to SQLite as they are; for PostgreSQL they become `$1`, `$2`… (once
//! per statement: prepared statements are kept by their SQL). Both dialects
//! take `INSERT … ON CONFLICT … DO UPDATE` and `excluded.`; the PostgreSQL
//! schema gives `readings` and `readings_1m` a `rowid` column, so queries
//! ordering by `rowid` read the same on both. Arguments are a few plain
//! kinds ([`Arg`]), results come back as owned [`Row`]s.

use super::store::StoreError;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio_postgres_rustls::MakeRustlsConnect;

/// One argument of a query.
#[derive(Clone, Copy, Debug)]
pub enum Arg<'a> {
    I64(i64),
    F64(f64),
    Str(&'a str),
    Bool(bool),
    OptBool(Option<bool>),
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Arg::I64(v) => v.to_sql(),
            Arg::F64(v) => v.to_sql(),
            Arg::Str(v) => v.to_sql(),
            Arg::Bool(v) => v.to_sql(),
            Arg::OptBool(v) => v.to_sql(),
        }
    }
}

impl Arg<'_> {
    fn pg(&self) -> &(dyn postgres::types::ToSql + Sync) {
        match self {
            Arg::I64(v) => v,
            Arg::F64(v) => v,
            Arg::Str(v) => v,
            Arg::Bool(v) => v,
            Arg::OptBool(v) => v,
        }
    }
}

/// One value of a result row.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Null,
    I(i64),
    F(f64),
    S(String),
    B(bool),
}

/// One result row, read out of the database.
#[derive(Clone, Debug, PartialEq)]
pub struct Row(Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("a row has no column {i}")))
    }

    fn wrong(&self, i: usize, want: &str) -> StoreError {
        StoreError::Corrupt(format!("column {i} is {:?}, not {want}", self.0.get(i)))
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::I(v) => Ok(Some(*v)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }

    pub fn f64(&self, i: usize) -> Result<f64, StoreError> {
        match self.cell(i)? {
            Cell::F(v) => Ok(*v),
            Cell::I(v) => Ok(*v as f64),
            _ => Err(self.wrong(i, "a number")),
        }
    }

    pub fn string(&self, i: usize) -> Result<String, StoreError> {
        match self.cell(i)? {
            Cell::S(v) => Ok(v.clone()),
            _ => Err(self.wrong(i, "text")),
        }
    }

    pub fn opt_bool(&self, i: usize) -> Result<Option<bool>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::B(v) => Ok(Some(*v)),
            Cell::I(v) => Ok(Some(*v != 0)),
            _ => Err(self.wrong(i, "a boolean")),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        self.opt_bool(i)?.ok_or_else(|| self.wrong(i, "a boolean"))
    }

    fn from_sqlite(r: &rusqlite::Row, n: usize) -> rusqlite::Result<Self> {
        use rusqlite::types::ValueRef;
        let mut cells = Vec::with_capacity(n);
        for i in 0..n {
            cells.push(match r.get_ref(i)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::I(v),
                ValueRef::Real(v) => Cell::F(v),
                ValueRef::Text(t) => Cell::S(String::from_utf8_lossy(t).into_owned()),
                ValueRef::Blob(_) => Cell::Null,
            });
        }
        Ok(Self(cells))
    }

    fn from_pg(r: &postgres::Row) -> Result<Self, StoreError> {
        use postgres::types::Type;
        let mut cells = Vec::with_capacity(r.len());
        for (i, column) in r.columns().iter().enumerate() {
            let t = column.type_();
            let cell = if *t == Type::INT8 {
                r.try_get::<_, Option<i64>>(i)?.map(Cell::I)
            } else if *t == Type::INT4 {
                r.try_get::<_, Option<i32>>(i)?.map(|v| Cell::I(v.into()))
            } else if *t == Type::INT2 {
                r.try_get::<_, Option<i16>>(i)?.map(|v| Cell::I(v.into()))
            } else if *t == Type::FLOAT8 {
                r.try_get::<_, Option<f64>>(i)?.map(Cell::F)
            } else if *t == Type::FLOAT4 {
                r.try_get::<_, Option<f32>>(i)?.map(|v| Cell::F(v.into()))
            } else if *t == Type::BOOL {
                r.try_get::<_, Option<bool>>(i)?.map(Cell::B)
            } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME {
                r.try_get::<_, Option<String>>(i)?.map(Cell::S)
            } else {
                return Err(StoreError::Corrupt(format!(
                    "column {} has type {t}, which the store does not read",
                    column.name()
                )));
            };
            cells.push(cell.unwrap_or(Cell::Null));
        }
        Ok(Self(cells))
    }
}

/// What a transaction is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxKind {
    /// A write that starts as a read (SQLite `DEFERRED`).
    Write,
    /// A write that takes the write lock up front (SQLite `IMMEDIATE`).
    WriteNow,
    /// Reads that see one snapshot (PostgreSQL `REPEATABLE READ`).
    Snapshot,
}

/// A connection to the store's database.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    /// Behind a lock only because the client's calls take `&mut`; each
    /// connection has one user at a time (the hub under its lock, the
    /// history reader under its own, retention's task).
    Postgres(Box<Mutex<Pg>>),
}

/// A PostgreSQL connection, its prepared statements, and how to open it
/// again after it broke.
pub struct Pg {
    /// Always there but in `drop`.
    client: Option<postgres::Client>,
    config: postgres::Config,
    /// With `sslmode=require`: TLS, verified (see [`crate::tls`]).
    tls: Option<MakeRustlsConnect>,
    statements: HashMap<String, postgres::Statement>,
    /// Statements run on every new connection (e.g. `SET …`).
    setup: Vec<String>,
    /// Inside a transaction: a lost connection is then an error, never
    /// connected again (the rest of the transaction would run without its
    /// beginning).
    in_tx: bool,
}

impl Pg {
    pub fn connect(config: &postgres::Config) -> Result<Self, StoreError> {
        let tls = match config.get_ssl_mode() {
            postgres::config::SslMode::Require => {
                let config = crate::tls::client_config("PostgreSQL").map_err(StoreError::Tls)?;
                Some(MakeRustlsConnect::new((*config).clone()))
            }
            // `prefer` (the default) in the clear: TLS here is always
            // verified, and a server's certificate often cannot be.
            _ => None,
        };
        let client = off_runtime(|| open(config, &tls))?;
        Ok(Self {
            client: Some(client),
            config: config.clone(),
            tls,
            statements: HashMap::new(),
            setup: Vec::new(),
            in_tx: false,
        })
    }

    /// The client, connected again first if the connection was lost.
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        let client = self.client.as_mut().expect("a client until dropped");
        if client.is_closed() {
            if self.in_tx {
                return Err(StoreError::ConnectionLost);
            }
            tracing::warn!("the store's PostgreSQL connection was lost; connecting again");
            self.statements.clear();
            let mut fresh = open(&self.config, &self.tls)?;
            for sql in &self.setup {
                fresh.batch_execute(sql)?;
            }
            *client = fresh;
        }
        Ok(client)
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, StoreError> {
        // First, so a connection made again starts with no statements.
        self.client()?;
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client()?.prepare(&postgres_sql(sql))?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

/// Connects to PostgreSQL, over `tls` when given; a failed TLS handshake
/// says what to do about it.
fn open(
    config: &postgres::Config,
    tls: &Option<MakeRustlsConnect>,
) -> Result<postgres::Client, StoreError> {
    match tls {
        Some(tls) => config.connect(tls.clone()),
        None => config.connect(postgres::NoTls),
    }
    .map_err(|e| match crate::tls::cause(&e) {
        Some(tls) => StoreError::Tls(crate::tls::explain(tls)),
        None => e.into(),
    })
}

impl Drop for Pg {
    /// The sync client's drop blocks on its runtime too, and a store may be
    /// dropped anywhere (the hub at shutdown, on the main thread's runtime;
    /// retention's task): it goes on a thread of its own.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

/// Runs `f`, which blocks on PostgreSQL, where that may block: the sync
/// client drives its own small runtime, which must not start on a thread
/// that runs async tasks. On a worker of a multi-threaded runtime it runs in
/// `block_in_place` (nested ones, and the hub's own around a commit, cost
/// nothing more); on a current-thread runtime (tests) on a thread of its
/// own; elsewhere (a blocking thread, no runtime) right here.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
            s.spawn(f)
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        }),
        Ok(_) => tokio::task::block_in_place(f),
        Err(_) => f(),
    }
}

/// `?1` → `$1`: SQLite's numbered placeholders in PostgreSQL's spelling.
fn postgres_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

impl Conn {
    /// A new connection to the PostgreSQL database `config` names.
    pub fn postgres(config: &postgres::Config) -> Result<Self, StoreError> {
        Ok(Conn::Postgres(Box::new(Mutex::new(Pg::connect(config)?))))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Conn::Postgres(_))
    }

    /// Runs `sql` (several statements, no arguments).
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => c.execute_batch(sql)?,
            Conn::Postgres(pg) => {
                let mut guard = lock(pg);
                let pg = &mut *guard;
                off_runtime(|| Ok::<_, StoreError>(pg.client()?.batch_execute(sql)?))?
            }
        }
        Ok(())
    }

    /// Runs `sql` now and on every connection made again after a loss
    /// (PostgreSQL; SQLite connections do not break).
    pub fn setup(&self, sql: &str) -> Result<(), StoreError> {
        self.batch(sql)?;
        if let Conn::Postgres(pg) = self {
            lock(pg).setup.push(sql.to_owned());
        }
        Ok(())
    }

    /// Runs one statement; returns the rows it changed.
    pub fn execute(&self, sql: &str, args: &[Arg]) -> Result<u64, StoreError> {
        match self {
            Conn::Sqlite(c) => {
                let n = c
                    .prepare_cached(sql)?
                    .execute(rusqlite::params_from_iter(args))?;
                Ok(n as u64)
            }
            Conn::Postgres(pg) => prepared(pg, sql, args, |client, stmt, params| {
                client.execute(stmt, params)
            }),
        }
    }

    /// Runs one query; returns all its rows.
    pub fn query(&self, sql: &str, args: &[Arg]) -> Result<Vec<Row>, StoreError> {
        match self {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let rows = stmt
                    .query_map(rusqlite::params_from_iter(args), |r| Row::from_sqlite(r, n))?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            }
            Conn::Postgres(pg) => prepared(pg, sql, args, |client, stmt, params| {
                client.query(stmt, params)
            })?
            .iter()
            .map(Row::from_pg)
            .collect(),
        }
    }

    /// Runs one query; returns its first row, if any.
    pub fn query_opt(&self, sql: &str, args: &[Arg]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// Runs `work` in one transaction: committed if it returns `Ok`, rolled
    /// back if not.
    pub fn transaction<T>(
        &mut self,
        kind: TxKind,
        work: impl FnOnce(&Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let begin = match (self.is_postgres(), kind) {
            (false, TxKind::WriteNow) => "BEGIN IMMEDIATE",
            (false, _) => "BEGIN",
            (true, TxKind::Snapshot) => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            (true, _) => "BEGIN",
        };
        self.batch(begin)?;
        self.in_transaction(true);
        // Rolls back if `work` fails or panics, so the connection is not
        // left in a transaction the next one would run inside.
        struct Open<'a>(&'a Conn);
        impl Drop for Open<'_> {
            fn drop(&mut self) {
                self.0.in_transaction(false);
                let _ = self.0.batch("ROLLBACK");
            }
        }
        let open = Open(self);
        let done = work(open.0)?;
        let committed = open.0.batch("COMMIT");
        // A COMMIT that fails ends PostgreSQL's transaction all the same;
        // SQLite's stays open (busy, say) and is rolled back.
        if committed.is_ok() || self.is_postgres() {
            std::mem::forget(open);
            self.in_transaction(false);
        }
        committed.map(|()| done)
    }

    fn in_transaction(&self, open: bool) {
        if let Conn::Postgres(pg) = self {
            lock(pg).in_tx = open;
        }
    }
}

/// Runs `run` with `sql` prepared (or taken from the cache) and `args`
/// bound, off the async runtime.
fn prepared<T: Send>(
    pg: &Mutex<Pg>,
    sql: &str,
    args: &[Arg],
    run: impl FnOnce(
        &mut postgres::Client,
        &postgres::Statement,
        &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<T, postgres::Error>
    + Send,
) -> Result<T, StoreError> {
    let mut guard = lock(pg);
    let pg = &mut *guard;
    off_runtime(|| {
        let stmt = pg.statement(sql)?;
        let params: Vec<_> = args.iter().map(Arg::pg).collect();
        Ok(run(pg.client()?, &stmt, &params)?)
    })
}

fn lock(pg: &Mutex<Pg>) -> std::sync::MutexGuard<'_, Pg> {
    pg.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_postgresqls() {
        assert_eq!(
            postgres_sql("SELECT ?1, ?12 FROM t WHERE a = '?' AND b = ?2"),
            "SELECT $1, $12 FROM t WHERE a = '?' AND b = $2"
        );
        assert_eq!(postgres_sql("SELECT 1"), "SELECT 1");
    }
}
