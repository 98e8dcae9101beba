//! SQLite files as the services keep them: checked before a service opens one, and copied while
//! it runs.
//!
//! Why check at all: SQLite reads a page only when a query needs it, so a file with one damaged
//! page opens without complaint and then fails only the requests that touch that page, a mix of
//! successes and errors that is hard to diagnose. Running `PRAGMA quick_check` (or
//! `integrity_check`, which also checks that every index matches its table) before anything
//! else turns that into a refusal to start that names the file and the damage.
//!
//! Why a backup here: the advice for a damaged file is "restore a backup", and a plain `cp` of a
//! live WAL-mode database can copy a torn, inconsistent file. [`backup_store`] uses SQLite's
//! online backup API (`sqlite3_backup_*`, through rusqlite) rather than `VACUUM INTO`: rusqlite
//! 0.32 links the very libsqlite3-sys sqlx uses, and the backup API copies the pages as they are
//! from one read snapshot, so it is consistent, works while the service writes (in WAL mode a
//! reader never blocks the writer), and does not rebuild every table and index as `VACUUM INTO`
//! would.
//!
//! Everything here is blocking file I/O; [`check`] runs it on the blocking pool for async
//! callers.

use std::{
    fmt::{self, Write as _},
    fs::OpenOptions,
    io,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use rusqlite::{backup::StepResult, Connection, ErrorCode, OpenFlags};

use crate::store_spec::{StoreCheck, StoreSpec};

/// Lines of a check's findings kept for the error message (SQLite is asked for no more).
pub const REPORTED_PROBLEMS: usize = 10;

/// Characters kept of each line of findings: they come from a damaged file.
const MAX_PROBLEM_CHARS: usize = 200;

/// How long a check or a backup waits for a lock that another connection (the running service)
/// holds, per attempt.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts of the backup's single step before it gives up on a source that stays locked.
const BACKUP_ATTEMPTS: usize = 20;

/// Pause between two such attempts.
const BACKUP_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// Where the docs tell how to recover; quoted in every refusal.
const RECOVERY_HINT: &str = "recover it with the sqlite3 shell's `.recover` command into a \
     new file, or restore a backup (docs/DEPLOYMENT.md, \"A damaged SQLite file\")";

/// Why a SQLite file was refused.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "{} is not a SQLite database ({reason}): check --store, or {RECOVERY_HINT}",
        path.display()
    )]
    NotADatabase { path: PathBuf, reason: String },
    #[error(
        "the SQLite file {} is damaged; PRAGMA {pragma} found:\n{problems}\nrefusing to use it: \
         {RECOVERY_HINT}",
        path.display()
    )]
    Damaged {
        path: PathBuf,
        pragma: &'static str,
        /// The first [`REPORTED_PROBLEMS`] lines of findings, each indented and shortened.
        problems: String,
    },
    #[error("cannot check the SQLite file {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the check of the SQLite file {} did not finish: {reason}", path.display())]
    Interrupted { path: PathBuf, reason: String },
}

/// Why a backup was not made. No file is left at the destination in any of these cases, except
/// [`BackupError::DestinationExists`], where it was there before.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup copies a SQLite store (--store sqlite:PATH), not {0:?}")]
    NotSqlite(StoreSpec),
    #[error("there is no SQLite file at {}", .0.display())]
    NoSource(PathBuf),
    #[error("{} already exists; backup never overwrites a file, choose a new name", .0.display())]
    DestinationExists(PathBuf),
    #[error("cannot create the backup file {}: {source}", path.display())]
    CreateDestination { path: PathBuf, source: io::Error },
    #[error("cannot back up {} to {}: {source}", from.display(), to.display())]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{} stayed locked; try again when it is less busy", .0.display())]
    SourceBusy(PathBuf),
    #[error(
        "the copy of {} does not pass PRAGMA quick_check, so it was removed; the store itself is \
         probably damaged:\n{problems}\n{RECOVERY_HINT}",
        from.display()
    )]
    BadCopy { from: PathBuf, problems: String },
}

/// Checks the SQLite file at `path` as [`check_file`] does, on the blocking pool.
pub async fn check(path: &Path, how: StoreCheck) -> Result<(), CheckError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || check_file(&owned, how))
        .await
        .map_err(|err| CheckError::Interrupted {
            path: path.to_owned(),
            reason: err.to_string(),
        })?
}

/// Runs `PRAGMA quick_check` (`integrity_check` for [`StoreCheck::Full`]) on the file at `path`.
/// A file that does not exist yet passes: the service creates it. Opening may replay a journal
/// left by a crash, exactly as the service's own first connection would.
pub fn check_file(path: &Path, how: StoreCheck) -> Result<(), CheckError> {
    if !path.exists() {
        return Ok(());
    }
    let unreadable = |source| CheckError::Unreadable {
        path: path.to_owned(),
        source,
    };
    let connection = open_existing(path).map_err(unreadable)?;
    check_connection(&connection, path, how)
}

/// The subcommands of the services that keep a store: `kv-service backup --store sqlite:PATH
/// --to FILE` (the store is the service's own `--store` flag, which is global).
#[derive(Debug, clap::Subcommand)]
pub enum StoreCommand {
    /// Copies a SQLite store to a new file with SQLite's online backup (safe while the service
    /// runs and writes), checks the copy, and exits.
    Backup {
        /// The backup file to write; it must not exist yet.
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
}

impl StoreCommand {
    /// Runs the command on `store`, printing what it did. Blocking: run it before anything else.
    pub fn run(&self, store: &StoreSpec) -> Result<(), BackupError> {
        match self {
            StoreCommand::Backup { to } => println!("{}", backup_store(store, to)?),
        }
        Ok(())
    }
}

/// A backup that was written; its `Display` is the line the `backup` commands print.
#[derive(Debug)]
pub struct Backup {
    pub from: PathBuf,
    pub to: PathBuf,
    /// Pages copied.
    pub pages: u64,
}

impl fmt::Display for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backed up sqlite:{} to {} ({} pages)",
            self.from.display(),
            self.to.display(),
            self.pages
        )
    }
}

/// Copies the SQLite store `spec` names to the new file `to` with SQLite's online backup, safe
/// while a service uses the store, then checks the copy with `quick_check`. Never overwrites
/// `to`.
pub fn backup_store(spec: &StoreSpec, to: &Path) -> Result<Backup, BackupError> {
    let StoreSpec::Sqlite(from) = spec else {
        return Err(BackupError::NotSqlite(spec.clone()));
    };
    if !from.is_file() {
        return Err(BackupError::NoSource(from.clone()));
    }
    create_new(to)?;
    let copied = copy_and_check(from, to);
    if copied.is_err() {
        // Only the file this call created (create_new refused an existing one), and the
        // journal files SQLite may have left beside it.
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let _ = std::fs::remove_file(sibling(to, suffix));
        }
    }
    Ok(Backup {
        from: from.clone(),
        to: to.to_owned(),
        pages: copied?,
    })
}

/// Creates `to` empty, failing if anything is there already: an empty file is a valid empty
/// database for SQLite, and creating it here rather than in SQLite makes the refusal atomic. A
/// journal left beside it by an earlier file of that name is refused too: SQLite would apply it
/// to the new file.
fn create_new(to: &Path) -> Result<(), BackupError> {
    for journal in [sibling(to, "-journal"), sibling(to, "-wal")] {
        if journal.exists() {
            return Err(BackupError::DestinationExists(journal));
        }
    }
    match OpenOptions::new().write(true).create_new(true).open(to) {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            Err(BackupError::DestinationExists(to.to_owned()))
        }
        Err(source) => Err(BackupError::CreateDestination {
            path: to.to_owned(),
            source,
        }),
    }
}

fn copy_and_check(from: &Path, to: &Path) -> Result<u64, BackupError> {
    let copy_error = |source| BackupError::Copy {
        from: from.to_owned(),
        to: to.to_owned(),
        source,
    };
    let source = open_existing(from).map_err(copy_error)?;
    let mut destination = open_existing(to).map_err(copy_error)?;
    let pages = copy_pages(&source, &mut destination, from).map_err(|err| match err {
        CopyFailure::Busy => BackupError::SourceBusy(from.to_owned()),
        CopyFailure::Sqlite(source) => copy_error(source),
    })?;
    check_connection(&destination, to, StoreCheck::Quick).map_err(|err| BackupError::BadCopy {
        from: from.to_owned(),
        problems: match err {
            CheckError::Damaged { problems, .. } => problems,
            other => format!("  {other}"),
        },
    })?;
    destination
        .close()
        .map_err(|(_, source)| copy_error(source))?;
    Ok(pages)
}

enum CopyFailure {
    Busy,
    Sqlite(rusqlite::Error),
}

/// Copies every page in one step, so the copy is one consistent snapshot of the source (a step
/// that is interrupted by a write from another connection would restart anyway). A source that
/// another connection holds locked is retried a bounded number of times.
fn copy_pages(
    source: &Connection,
    destination: &mut Connection,
    from: &Path,
) -> Result<u64, CopyFailure> {
    let backup = rusqlite::backup::Backup::new(source, destination).map_err(CopyFailure::Sqlite)?;
    for _ in 0..BACKUP_ATTEMPTS {
        match backup.step(-1).map_err(CopyFailure::Sqlite)? {
            StepResult::Done => {
                let pages = backup.progress().pagecount;
                return Ok(u64::try_from(pages).unwrap_or(0));
            }
            StepResult::More => continue,
            StepResult::Busy | StepResult::Locked => {
                tracing::info!(file = %from.display(), "the store is locked; retrying the backup");
                thread::sleep(BACKUP_RETRY_PAUSE);
            }
            // StepResult is non-exhaustive; nothing else is documented.
            _ => thread::sleep(BACKUP_RETRY_PAUSE),
        }
    }
    Err(CopyFailure::Busy)
}

/// Opens an existing file read-write, never creating one. Read-write rather than read-only
/// because a WAL-mode file needs its shared-memory index, which a read-only connection may be
/// unable to create.
fn open_existing(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    Ok(connection)
}

fn check_connection(
    connection: &Connection,
    path: &Path,
    how: StoreCheck,
) -> Result<(), CheckError> {
    let pragma = match how {
        StoreCheck::Quick => "quick_check",
        StoreCheck::Full => "integrity_check",
    };
    let findings = run_pragma(connection, pragma).map_err(|err| classify(err, path, pragma))?;
    if findings.len() == 1 && findings[0] == "ok" {
        return Ok(());
    }
    Err(CheckError::Damaged {
        path: path.to_owned(),
        pragma,
        problems: describe(&findings),
    })
}

/// The pragma's result rows: `ok` alone for a sound file, else one line per problem found. A
/// damaged page can also stop the pragma with an error ("database disk image is malformed")
/// after it has reported what its page-level pass found: that error is then the last finding.
fn run_pragma(connection: &Connection, pragma: &str) -> rusqlite::Result<Vec<String>> {
    // One line fewer than reported, to leave room for that error.
    let sql = format!("PRAGMA {pragma}({})", REPORTED_PROBLEMS - 1);
    let mut statement = connection.prepare(&sql)?;
    let mut rows = statement.query([])?;
    let mut findings = Vec::new();
    loop {
        match rows.next() {
            Ok(Some(row)) if findings.len() < REPORTED_PROBLEMS => findings.push(row.get(0)?),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(findings),
            Err(err) if is_corrupt(&err) && !findings.is_empty() => {
                findings.push(err.to_string());
                return Ok(findings);
            }
            Err(err) => return Err(err),
        }
    }
}

fn is_corrupt(err: &rusqlite::Error) -> bool {
    err.sqlite_error_code() == Some(ErrorCode::DatabaseCorrupt)
}

/// Damage bad enough that the pragma itself fails (the schema or the first page) is still
/// damage; "file is not a database" is its own case.
fn classify(err: rusqlite::Error, path: &Path, pragma: &'static str) -> CheckError {
    match err.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => CheckError::NotADatabase {
            path: path.to_owned(),
            reason: err.to_string(),
        },
        Some(ErrorCode::DatabaseCorrupt) => CheckError::Damaged {
            path: path.to_owned(),
            pragma,
            problems: describe(&[err.to_string()]),
        },
        _ => CheckError::Unreadable {
            path: path.to_owned(),
            source: err,
        },
    }
}

/// The findings, indented, one line each (SQLite puts several in one row, a line apiece), at
/// most [`REPORTED_PROBLEMS`] lines, each cut to [`MAX_PROBLEM_CHARS`] and stripped of control
/// characters (they may quote bytes of the damaged file).
fn describe(findings: &[String]) -> String {
    let lines = findings.iter().flat_map(|finding| finding.lines());
    let mut text = String::new();
    for (index, line) in lines.take(REPORTED_PROBLEMS).enumerate() {
        if index > 0 {
            text.push('\n');
        }
        let clean: String = line
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_PROBLEM_CHARS)
            .collect();
        let _ = write!(text, "  {clean}");
    }
    text
}

/// `path` with `suffix` appended to its file name (`kv.db` → `kv.db-wal`).
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Builds damaged files for the tests of the crates that check them.
#[cfg(any(test, feature = "testing"))]
pub mod damage {
    use std::{
        fs::OpenOptions,
        io::{self, Read, Seek, SeekFrom, Write},
        path::Path,
    };

    /// The page size a SQLite file's header declares (big-endian at bytes 16-17; 1 means 65536).
    pub fn page_size(path: &Path) -> io::Result<u64> {
        let mut header = [0u8; 100];
        std::fs::File::open(path)?.read_exact(&mut header)?;
        Ok(match u16::from_be_bytes([header[16], header[17]]) {
            1 => 65_536,
            size => u64::from(size),
        })
    }

    /// Overwrites the page in the middle of the file with garbage and returns its number
    /// (1-based, as SQLite counts). Folds the WAL into the file first: a WAL left beside it (a
    /// store whose last connection to close was a reader leaves one) could hold a good copy of
    /// that page. Nothing may have the file open.
    pub fn garble_middle_page(path: &Path) -> io::Result<u64> {
        checkpoint(path).map_err(io::Error::other)?;
        let page_size = page_size(path)?;
        let pages = std::fs::metadata(path)?.len() / page_size;
        if pages < 3 {
            return Err(io::Error::other(
                "too few pages to damage one in the middle",
            ));
        }
        let page = pages / 2;
        let garbage: Vec<u8> = (0..page_size).map(|i| (i * 7 + 13) as u8).collect();
        let mut file = OpenOptions::new().write(true).open(path)?;
        file.seek(SeekFrom::Start(page * page_size))?;
        file.write_all(&garbage)?;
        file.sync_all()?;
        Ok(page + 1)
    }

    /// Copies every page of the WAL into the file and empties the WAL.
    fn checkpoint(path: &Path) -> rusqlite::Result<()> {
        let connection = super::open_existing(path)?;
        connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        connection.close().map_err(|(_, err)| err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of enough rows to span many pages, closed cleanly.
    fn database(path: &Path, rows: usize) {
        let connection = Connection::open(path).unwrap();
        connection
            .execute_batch(
                "PRAGMA journal_mode=WAL;
                 CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            )
            .unwrap();
        let filler = "v".repeat(200);
        for row in 0..rows {
            connection
                .execute(
                    "INSERT INTO kv VALUES (?1, ?2)",
                    (format!("key-{row:05}"), &filler),
                )
                .unwrap();
        }
        connection.close().unwrap();
    }

    fn rows(path: &Path) -> i64 {
        let connection = Connection::open(path).unwrap();
        connection
            .query_row("SELECT count(*) FROM kv", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn an_intact_file_passes_both_checks_and_a_missing_one_is_left_to_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("intact.db");
        check_file(&path, StoreCheck::Quick).unwrap();
        assert!(!path.exists(), "the check created the file");
        database(&path, 500);
        check_file(&path, StoreCheck::Quick).unwrap();
        check_file(&path, StoreCheck::Full).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(
            &path,
            "these are not the pages you are looking for\n".repeat(100),
        )
        .unwrap();
        let err = check_file(&path, StoreCheck::Quick).unwrap_err();
        assert!(matches!(err, CheckError::NotADatabase { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("not a SQLite database"), "{message}");
        assert!(message.contains(".recover"), "{message}");
    }

    #[test]
    fn a_damaged_page_is_refused_by_both_checks_with_the_damage_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged.db");
        database(&path, 2000);
        let page = damage::garble_middle_page(&path).unwrap();
        for how in [StoreCheck::Quick, StoreCheck::Full] {
            let err = check_file(&path, how).unwrap_err();
            let CheckError::Damaged { problems, .. } = &err else {
                panic!("page {page} garbled, yet {how:?} says {err:?}");
            };
            assert!(problems.contains(&format!("page {page}")), "{problems}");
            assert!(problems.lines().count() <= REPORTED_PROBLEMS, "{problems}");
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains("is damaged"), "{message}");
            assert!(message.contains(".recover"), "{message}");
        }
    }

    #[test]
    fn findings_are_bounded_and_cleaned() {
        let findings: Vec<String> = (0..50)
            .map(|i| format!("row {i}\x1b[31m{}", "x".repeat(500)))
            .collect();
        let text = describe(&findings);
        assert_eq!(text.lines().count(), REPORTED_PROBLEMS);
        assert!(text
            .lines()
            .all(|line| line.chars().count() <= MAX_PROBLEM_CHARS + 2));
        assert!(!text.contains('\x1b'));
        let rows = ["*** in database main ***\nTree 2 page 81: bad".to_owned()];
        assert_eq!(
            describe(&rows),
            "  *** in database main ***\n  Tree 2 page 81: bad"
        );
    }

    #[test]
    fn a_backup_holds_every_row_and_passes_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("live.db");
        let to = dir.path().join("backup.db");
        database(&from, 1000);
        // A connection open on the source, as the running service would have.
        let live = Connection::open(&from).unwrap();
        live.execute("INSERT INTO kv VALUES ('late', 'x')", [])
            .unwrap();
        let pages = backup_store(&StoreSpec::Sqlite(from.clone()), &to)
            .unwrap()
            .pages;
        assert!(pages > 2, "{pages} pages");
        check_file(&to, StoreCheck::Full).unwrap();
        assert_eq!(rows(&to), 1001);
        drop(live);
    }

    #[test]
    fn a_backup_never_overwrites_and_needs_a_sqlite_source() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("live.db");
        let to = dir.path().join("taken.db");
        database(&from, 10);
        std::fs::write(&to, "keep me").unwrap();
        let err = backup_store(&StoreSpec::Sqlite(from.clone()), &to).unwrap_err();
        assert!(matches!(err, BackupError::DestinationExists(_)), "{err:?}");
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "keep me");
        let stale_wal = dir.path().join("other.db-wal");
        std::fs::write(&stale_wal, "a journal of an earlier file").unwrap();
        let err = backup_store(
            &StoreSpec::Sqlite(from.clone()),
            &dir.path().join("other.db"),
        )
        .unwrap_err();
        assert!(matches!(err, BackupError::DestinationExists(_)), "{err:?}");
        assert!(!dir.path().join("other.db").exists());
        assert!(stale_wal.exists());

        let fresh = dir.path().join("fresh.db");
        for spec in [
            StoreSpec::Memory,
            StoreSpec::Postgres("postgres://u:pw@h/db".into()),
        ] {
            let err = backup_store(&spec, &fresh).unwrap_err();
            assert!(matches!(err, BackupError::NotSqlite(_)), "{err:?}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
        let missing = StoreSpec::Sqlite(dir.path().join("missing.db"));
        let err = backup_store(&missing, &fresh).unwrap_err();
        assert!(matches!(err, BackupError::NoSource(_)), "{err:?}");
        assert!(!fresh.exists());
    }

    #[test]
    fn a_backup_of_a_damaged_file_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("damaged.db");
        let to = dir.path().join("backup.db");
        database(&from, 2000);
        damage::garble_middle_page(&from).unwrap();
        let err = backup_store(&StoreSpec::Sqlite(from), &to).unwrap_err();
        assert!(matches!(err, BackupError::BadCopy { .. }), "{err:?}");
        assert!(err.to_string().contains("damaged.db"), "{err}");
        assert!(!to.exists());
    }
}
