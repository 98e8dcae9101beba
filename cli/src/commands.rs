//! One function per command: the request it makes and how its answer is shown.

use std::io::{Read, Write};

use reqwest::Method;
use serde_json::{json, Value};

use crate::{
    client::{path_escape, Gateway},
    sse::{Event, EventReader},
    table::{escape, Table},
    Cli, CliError, Command, KvCommand, LogsArgs, NoticeCommand,
};
use shared::token::MintArgs;

pub(crate) async fn run(cli: Cli) -> Result<(), CliError> {
    let out = &mut std::io::stdout().lock();
    let json = cli.json;
    let gateway = || Gateway::new(&cli.gateway, cli.token.clone(), cli.timeout);
    match &cli.command {
        Command::Token(args) => token(args, out),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "msctl", out);
            Ok(())
        }
        Command::Topology => topology(&gateway()?, json, out).await,
        Command::Connections { history } => connections(&gateway()?, json, *history, out).await,
        Command::Logs(args) => logs(&gateway()?, json, args, out).await,
        Command::Notice(command) => notice(&gateway()?, json, command, out).await,
        Command::Kv(command) => kv(&gateway()?, json, command, out).await,
    }
}

fn print_json(out: &mut impl Write, value: &Value) -> Result<(), CliError> {
    writeln!(out, "{value}")?;
    Ok(())
}

/// A JSON field as table text: strings as they are, null as `-`, anything else as JSON.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn items(answer: &Value, field: &str) -> Result<Vec<Value>, CliError> {
    answer
        .get(field)
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| CliError::BadAnswer(format!("no {field:?} list in {answer}")))
}

fn token(args: &MintArgs, out: &mut impl Write) -> Result<(), CliError> {
    writeln!(out, "{}", args.mint()?)?;
    Ok(())
}

async fn topology(gateway: &Gateway, json: bool, out: &mut impl Write) -> Result<(), CliError> {
    let answer = gateway.json(Method::GET, "/_/topology", &[], None).await?;
    if json {
        return print_json(out, &answer);
    }
    writeln!(out, "source: {}", text(&answer["source"]))?;
    let mut table = Table::new(&["ROUTE", "SCOPES", "SERVICE", "NODE", "CONNECTION", "READY"]);
    for route in items(&answer, "routes")? {
        let scopes: Vec<String> = route["scopes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        for node in route["nodes"].as_array().into_iter().flatten() {
            table.row(vec![
                text(&route["url"]),
                if scopes.is_empty() {
                    "-".into()
                } else {
                    scopes.join(" ")
                },
                text(&node["name"]),
                text(&node["addr"]),
                connection(node["connected"].as_bool()),
                readiness(&node["ready"]),
            ]);
        }
    }
    table.write(out)?;
    Ok(())
}

fn connection(connected: Option<bool>) -> String {
    match connected {
        Some(true) => "connected".into(),
        _ => "disconnected".into(),
    }
}

/// `ready` is written only when false.
fn readiness(ready: &Value) -> String {
    if ready == &Value::Bool(false) {
        "no".into()
    } else {
        "yes".into()
    }
}

async fn connections(
    gateway: &Gateway,
    json: bool,
    history: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let answer = gateway
        .json(Method::GET, "/_/connections", &[], None)
        .await?;
    if json {
        return print_json(out, &answer);
    }
    let http = &answer["http"];
    writeln!(
        out,
        "gateway: {} open HTTP connections, {} open streams, {} requests in flight",
        text(&http["open_connections"]),
        text(&http["open_streams"]),
        text(&http["in_flight"]),
    )?;
    let nodes = items(&answer, "nodes")?;
    let mut table = Table::new(&[
        "SERVICE",
        "NODE",
        "STATE",
        "SINCE",
        "READY",
        "IN FLIGHT",
        "REQUESTS",
        "ERRORS",
    ]);
    for node in &nodes {
        let state = match (node["in_topology"].as_bool(), node["connected"].as_bool()) {
            (Some(false), _) => "left".to_owned(),
            (_, connected) => connection(connected),
        };
        table.row(vec![
            text(&node["name"]),
            text(&node["addr"]),
            state,
            text(&node["since"]),
            readiness(&node["ready"]),
            text(&node["in_flight"]),
            text(&node["requests"]),
            text(&node["errors"]),
        ]);
    }
    table.write(out)?;
    if history {
        let mut changes = Table::new(&["NODE", "AT", "STATE"]);
        for node in &nodes {
            for change in node["history"].as_array().into_iter().flatten() {
                changes.row(vec![
                    text(&node["addr"]),
                    text(&change["at"]),
                    connection(change["connected"].as_bool()),
                ]);
            }
        }
        writeln!(out)?;
        changes.write(out)?;
    }
    Ok(())
}

/// The query of the parameters that are given.
fn query(params: &[(&'static str, Option<String>)]) -> Vec<(&'static str, String)> {
    params
        .iter()
        .filter_map(|(name, value)| Some((*name, value.clone()?)))
        .collect()
}

fn log_query(args: &LogsArgs) -> Vec<(&'static str, String)> {
    query(&[
        ("level", args.level.clone()),
        ("service", args.service.clone()),
        ("limit", args.limit.map(|limit| limit.to_string())),
    ])
}

fn log_row(line: &Value) -> Vec<String> {
    vec![
        text(&line["time"]),
        text(&line["level"]),
        text(&line["node"]),
        text(&line["message"]),
    ]
}

async fn logs(
    gateway: &Gateway,
    json: bool,
    args: &LogsArgs,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut query = log_query(args);
    if args.follow {
        query.push(("follow", "1".into()));
        let mut events = gateway.stream("/_/logs", &query).await?;
        return follow(&mut events, out, |event, out| {
            let line: Value = parse_data(event)?;
            if json {
                print_json(out, &line)?;
            } else if event.event == "log" {
                let row = log_row(&line);
                writeln!(out, "{}", row.join("  "))?;
            }
            Ok(Flow::Continue)
        })
        .await;
    }
    let answer = gateway.json(Method::GET, "/_/logs", &query, None).await?;
    if json {
        return print_json(out, &answer);
    }
    let mut table = Table::new(&["TIME", "LEVEL", "NODE", "MESSAGE"]);
    for line in items(&answer, "lines")? {
        table.row(log_row(&line));
    }
    table.write(out)?;
    let missing: Vec<String> = answer["missing"]
        .as_array()
        .into_iter()
        .flatten()
        .map(text)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "msctl: no answer in time from {}: their lines are not shown",
            missing.join(", ")
        );
    }
    Ok(())
}

async fn notice(
    gateway: &Gateway,
    json: bool,
    command: &NoticeCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match command {
        NoticeCommand::Send {
            message,
            topic,
            to,
            at,
        } => {
            let mut body = json!({ "message": message });
            for (field, value) in [("topic", topic), ("to", to), ("at", at)] {
                if let Some(value) = value {
                    body[field] = json!(value);
                }
            }
            let answer = gateway
                .json(Method::POST, "/notices", &[], Some(&body))
                .await?;
            if json {
                return print_json(out, &answer);
            }
            if answer["scheduled"] == Value::Bool(true) {
                writeln!(out, "scheduled for {}", text(&answer["at"]))?;
            } else {
                writeln!(out, "published #{}", text(&answer["id"]))?;
            }
            Ok(())
        }
        NoticeCommand::Tail {
            topics,
            name,
            after,
        } => {
            let query = query(&[
                ("topics", topics.clone()),
                ("name", name.clone()),
                ("after", after.map(|after| after.to_string())),
            ]);
            let mut events = gateway.stream("/notices/stream", &query).await?;
            follow(&mut events, out, |event, out| {
                let data = parse_data(event)?;
                if json {
                    print_json(
                        out,
                        &json!({"event": event.event, "id": event.id, "data": data}),
                    )?;
                }
                match event.event.as_str() {
                    "notice" => {
                        if !json {
                            writeln!(out, "{}", notice_line(&data))?;
                        }
                        Ok(Flow::Continue)
                    }
                    "reset" => {
                        eprintln!(
                            "msctl: the resume point is gone; notices may have been missed ({data})"
                        );
                        Ok(Flow::Continue)
                    }
                    // The service ended the subscription: said on stderr, and the end of the
                    // command. Being kicked or a restarting service is an orderly end; falling
                    // behind lost notices.
                    "kicked" | "shutdown" => {
                        eprintln!("msctl: the subscription ended: {}", event.event);
                        Ok(Flow::Stop)
                    }
                    "lagged" => Err(CliError::Stream(format!(
                        "this subscriber fell behind and was cut off; resume with --after {}",
                        text(&data["last_event_id"])
                    ))),
                    _ => Ok(Flow::Continue),
                }
            })
            .await
        }
        NoticeCommand::Who => {
            let answer = gateway
                .json(Method::GET, "/notices/subscribers", &[], None)
                .await?;
            if json {
                return print_json(out, &answer);
            }
            let mut table = Table::new(&["NAME", "SINCE", "TOPICS"]);
            for subscriber in items(&answer, "items")? {
                let topics: Vec<String> = subscriber["topics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                table.row(vec![
                    text(&subscriber["name"]),
                    text(&subscriber["since"]),
                    if topics.is_empty() {
                        "-".into()
                    } else {
                        topics.join(",")
                    },
                ]);
            }
            table.write(out)?;
            Ok(())
        }
        NoticeCommand::Kick { name } => {
            if name.is_empty() {
                return Err(CliError::Usage("kick needs a subscriber's name".into()));
            }
            let path = format!("/notices/subscribers/{}", path_escape(name));
            let answer = gateway.json(Method::DELETE, &path, &[], None).await?;
            if json {
                return print_json(out, &answer);
            }
            writeln!(
                out,
                "kicked {} subscription(s) named {}",
                text(&answer["kicked"]),
                escape(name)
            )?;
            Ok(())
        }
    }
}

fn notice_line(notice: &Value) -> String {
    let audience = if !notice["to"].is_null() {
        format!("to {}", text(&notice["to"]))
    } else if !notice["topic"].is_null() {
        format!("#{}", text(&notice["topic"]))
    } else {
        "everyone".into()
    };
    format!(
        "{}  #{}  {}  from {}: {}",
        text(&notice["created_at"]),
        text(&notice["id"]),
        audience,
        text(&notice["from"]),
        escape(&text(&notice["message"])),
    )
}

/// The path of a key.
fn key_path(key: &str) -> Result<String, CliError> {
    if key.is_empty() {
        return Err(CliError::Usage("a key cannot be empty".into()));
    }
    Ok(format!("/kv/{}", path_escape(key)))
}

fn kv_table(entries: &[Value]) -> Table {
    // `revision` and `expires_at` come with the kv-service that has them.
    let mut table = Table::new(&["KEY", "VERSION", "REVISION", "EXPIRES", "VALUE"]);
    for entry in entries {
        table.row(vec![
            text(&entry["key"]),
            text(&entry["version"]),
            text(&entry["revision"]),
            text(&entry["expires_at"]),
            text(&entry["value"]),
        ]);
    }
    table
}

async fn kv(
    gateway: &Gateway,
    json: bool,
    command: &KvCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let answer = match command {
        KvCommand::Get { key } => {
            gateway
                .json(Method::GET, &key_path(key)?, &[], None)
                .await?
        }
        KvCommand::Put {
            key,
            value,
            ttl,
            if_version,
        } => {
            let value = if value == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text
            } else {
                value.clone()
            };
            let query = query(&[
                ("ttl", ttl.clone()),
                ("if_version", if_version.map(|version| version.to_string())),
            ]);
            // As JSON, so an empty value is a value (a plain empty body would be none).
            let body = json!({ "value": value });
            gateway
                .json(Method::PUT, &key_path(key)?, &query, Some(&body))
                .await?
        }
        KvCommand::Del { key } => {
            gateway
                .json(Method::DELETE, &key_path(key)?, &[], None)
                .await?
        }
        KvCommand::Ls {
            prefix,
            after,
            limit,
        } => {
            let query = query(&[
                ("limit", Some(limit.to_string())),
                ("prefix", prefix.clone()),
                ("after", after.clone()),
            ]);
            let answer = gateway.json(Method::GET, "/kv", &query, None).await?;
            if json {
                return print_json(out, &answer);
            }
            kv_table(&items(&answer, "items")?).write(out)?;
            if let Some(next) = answer["next"].as_str() {
                eprintln!("msctl: more keys follow: --after {next:?}");
            }
            return Ok(());
        }
        KvCommand::Watch {
            key,
            prefix,
            from_revision,
        } => return kv_watch(gateway, json, key, prefix, *from_revision, out).await,
    };
    if json {
        return print_json(out, &answer);
    }
    match command {
        KvCommand::Del { key } => writeln!(out, "deleted {}", escape(key))?,
        _ => kv_table(&[answer]).write(out)?,
    }
    Ok(())
}

async fn kv_watch(
    gateway: &Gateway,
    json: bool,
    key: &Option<String>,
    prefix: &Option<String>,
    from_revision: Option<u64>,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let mut query = query(&[
        ("watch", Some("1".to_owned())),
        (
            "from_revision",
            from_revision.map(|revision| revision.to_string()),
        ),
    ]);
    let path = match (key, prefix) {
        (Some(key), _) => key_path(key)?,
        (None, Some(prefix)) => {
            query.push(("prefix", prefix.clone()));
            "/kv".to_owned()
        }
        (None, None) => return Err(CliError::Usage("watch needs a key or --prefix".into())),
    };
    let mut events = gateway.stream(&path, &query).await?;
    follow(&mut events, out, |event, out| {
        let data = parse_data(event)?;
        if json {
            print_json(
                out,
                &json!({"event": event.event, "id": event.id, "data": data}),
            )?;
            return Ok(Flow::Continue);
        }
        match event.event.as_str() {
            "put" | "delete" | "expire" => {
                let mut line = format!(
                    "{}  {}  version {}  revision {}",
                    event.event,
                    escape(&text(&data["key"])),
                    text(&data["version"]),
                    text(&data["revision"]),
                );
                if let Some(value) = data.get("value").filter(|value| !value.is_null()) {
                    line.push_str("  ");
                    line.push_str(&escape(&text(value)));
                }
                writeln!(out, "{line}")?;
            }
            "reset" => eprintln!(
                "msctl: changes before revision {} are no longer kept; read the keys again",
                text(&data["oldest_revision"])
            ),
            _ => {}
        }
        Ok(Flow::Continue)
    })
    .await
}

/// Whether a followed stream goes on after an event.
enum Flow {
    Continue,
    Stop,
}

fn parse_data(event: &Event) -> Result<Value, CliError> {
    if event.data.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&event.data).map_err(|err| {
        CliError::BadAnswer(format!("event {} has no JSON data: {err}", event.event))
    })
}

/// Hands every event to `show` until it stops, the stream ends or it fails. The gateway's final
/// `event: error` (the service failed, its connection closed, this client read too slowly) is
/// a failure.
async fn follow<W: Write>(
    events: &mut EventReader,
    out: &mut W,
    mut show: impl FnMut(&Event, &mut W) -> Result<Flow, CliError>,
) -> Result<(), CliError> {
    while let Some(event) = events.next().await? {
        if event.event == "error" {
            let data = parse_data(&event).unwrap_or(Value::Null);
            return Err(CliError::Stream(text(&data["error"])));
        }
        let flow = show(&event, out)?;
        out.flush()?;
        if let Flow::Stop = flow {
            break;
        }
    }
    Ok(())
}
