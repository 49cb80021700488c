//! One run: register the fleet, bring every device online, apply the load for the set
//! time, drain, measure, check exactly-once against PostgreSQL, report.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::Rng;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Semaphore;
use uplink_protocol::sign;

use super::args::Args;
use super::check;
use super::fleet::{Fleet, SimDevice};
use super::flows::{session_flow, FlowShape};
use super::operator::Operator;
use super::procs::Watched;
use super::report::{Devices, Machine, Report};

fn pg_port(database_url: &str) -> u16 {
    url::Url::parse(database_url)
        .ok()
        .and_then(|u| u.port())
        .unwrap_or(5432)
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    args.validate().map_err(anyhow::Error::msg)?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await
        .context("could not connect to --database-url")?;
    let operator = Operator::new(args.apis.clone(), args.operator_token.clone());
    let key = operator
        .get("/v1/command-key")
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.kind))?;
    let command_key = sign::decode_public(key["public_key"].as_str().unwrap_or(""))
        .context("GET /v1/command-key: no public key")?;
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("lg-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let devices: Vec<Arc<SimDevice>> = (0..args.devices)
        .map(|i| Arc::new(SimDevice::new(format!("{prefix}{i:05}"), sign::generate())))
        .collect();
    let fleet = Fleet::new(
        devices,
        command_key,
        args.broker,
        args.mqtt_port,
        args.request_timeout(),
    );

    println!("registering {} devices ({prefix}*)", args.devices);
    let register_started = Instant::now();
    operator
        .register(&fleet.devices, args.register_concurrency, &fleet.stats)
        .await
        .map_err(anyhow::Error::msg)?;
    let register_secs = register_started.elapsed().as_secs_f64();

    println!("connecting at {}/s", args.connect_rate);
    let connect_started = Instant::now();
    let mut ramp =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.connect_rate)));
    for i in 0..args.devices {
        ramp.tick().await;
        fleet.connect(i);
    }
    let deadline = Instant::now() + Duration::from_secs(args.online_timeout);
    let mut online = 0;
    loop {
        let connected = fleet.connected.load(Ordering::SeqCst);
        if connected == args.devices {
            online = check::online_count(&pool, &prefix).await?;
            if online as usize == args.devices {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "after {} s: {connected} of {} devices connected, {online} online in the API",
                args.online_timeout,
                args.devices
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all_online_secs = connect_started.elapsed().as_secs_f64();
    println!(
        "all {} devices online after {all_online_secs:.1} s; load for {} s",
        args.devices, args.duration
    );

    let mut watched: Vec<Watched> = args
        .pids
        .iter()
        .map(|(name, pid)| Watched::new(name, *pid))
        .collect();
    watched.push(Watched::new("uplink-loadgen", std::process::id()));
    let watched = Arc::new(Mutex::new(watched));
    let pg = pg_port(&args.database_url);
    let load_started = Instant::now();
    let load_end = load_started + Duration::from_secs(args.duration);
    let sampler = {
        let watched = watched.clone();
        tokio::spawn(async move {
            loop {
                for w in watched.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
                    w.sample(pg);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    let mut tasks = Vec::new();
    if args.command_rate > 0.0 {
        let (fleet, operator, n) = (fleet.clone(), operator.clone(), args.devices);
        let period = Duration::from_secs_f64(1.0 / args.command_rate);
        tasks.push(tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(512));
            let mut tick = tokio::time::interval(period);
            let mut issued = Vec::new();
            let mut i = rand::thread_rng().gen_range(0..n);
            while Instant::now() < load_end {
                tick.tick().await;
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let (fleet, operator) = (fleet.clone(), operator.clone());
                let idx = i % n;
                i += 1;
                issued.push(tokio::spawn(async move {
                    operator.issue_command(&fleet, idx).await;
                    drop(permit);
                }));
            }
            for t in issued {
                let _ = t.await;
            }
        }));
    }
    let shape = FlowShape {
        parts: args.parts,
        presign_only: args.presign_only,
        part_bytes: args.part_bytes,
    };
    let pace = (args.session_rate > 0.0).then(|| {
        Arc::new(tokio::sync::Mutex::new(tokio::time::interval(
            Duration::from_secs_f64(1.0 / args.session_rate),
        )))
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()
        .context("http client")?;
    for w in 0..args.session_workers {
        let idx = w * args.devices / args.session_workers;
        let (fleet, http, pace) = (fleet.clone(), http.clone(), pace.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < load_end {
                if let Some(p) = &pace {
                    p.lock().await.tick().await;
                    if Instant::now() >= load_end {
                        break;
                    }
                }
                session_flow(&fleet, &http, &fleet.devices[idx], shape).await;
            }
        }));
    }
    let refresher = (args.status_every > 0).then(|| {
        let (fleet, n) = (fleet.clone(), args.devices);
        let period = Duration::from_secs_f64(args.status_every as f64 / n as f64);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            for i in (0..).map(|i| i % n) {
                tick.tick().await;
                fleet.refresh_status(i);
            }
        })
    });
    for t in tasks {
        let _ = t.await;
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    if let Some(r) = refresher {
        r.abort();
    }

    let drain_end = Instant::now() + Duration::from_secs(args.drain);
    while fleet.ledger().commands_open() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sampler.abort();
    let processes = watched
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|w| w.summary(load_secs))
        .collect();
    let online_at_end = check::online_count(&pool, &prefix).await?;
    let connected_max = fleet.max_connected.load(Ordering::SeqCst);
    fleet.stop().await;

    let (mut problems, dup) = {
        let ledger = fleet.ledger();
        for d in ledger.delivery_latencies() {
            fleet.stats.ok("command.deliver", d);
        }
        (ledger.problems(), ledger.duplicate_deliveries())
    };
    let outcome = {
        let ledger = std::mem::take(&mut *fleet.ledger());
        check::against_database(&pool, &prefix, &ledger).await?
    };
    problems.extend(outcome.problems.iter().cloned());
    Ok(Report {
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: Machine::here(),
        args,
        load_secs: (load_secs * 10.0).round() / 10.0,
        devices: Devices {
            registered: fleet.devices.len(),
            register_secs: (register_secs * 10.0).round() / 10.0,
            connected_max,
            all_online_secs: (all_online_secs * 10.0).round() / 10.0,
            online_in_api_at_start: online,
            online_in_api_at_end: online_at_end,
        },
        ops: fleet.stats.summary(Duration::from_secs_f64(load_secs)),
        duplicate_command_deliveries: dup,
        processes,
        exactly_once: problems.is_empty(),
        outcome,
        problems,
    })
}
