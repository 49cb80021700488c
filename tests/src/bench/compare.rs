//! The comparison: every setting (part size × parts in flight) runs the agent, aws-cli,
//! s5cmd, rclone and parallel curl `reps` times in rotating order, storage reached
//! directly; the table shows medians. Each tool uploads a file of its own content (so
//! dedupe cannot short-cut it) and each object is checked byte-identical.

use std::time::Duration;

use super::agent::{agent_once, options, Split};
use super::curl::curl_run;
use super::{median, mib_per_s, Config, Target, Tool};
use crate::stack::Stack;
use crate::MIB;

/// Medians of one tool's runs at one setting.
#[derive(Default)]
struct Row {
    mib_s: Vec<f64>,
    cpu_per_gib: Vec<f64>,
    rss_mib: Vec<f64>,
    server_cpu_per_gib: Vec<f64>,
}

impl Row {
    fn add(&mut self, size: u64, secs: f64, cpu_secs: f64, rss_kib: u64, server_cpu_secs: f64) {
        let gib = size as f64 / (1u64 << 30) as f64;
        self.mib_s.push(mib_per_s(size, secs));
        self.cpu_per_gib.push(cpu_secs / gib);
        self.rss_mib.push(rss_kib as f64 / 1024.0);
        self.server_cpu_per_gib.push(server_cpu_secs / gib);
    }

    /// The S3 server's median CPU seconds per GiB of this client's uploads.
    fn server_cpu(&self) -> f64 {
        median(self.server_cpu_per_gib.clone())
    }

    fn cell(&self) -> String {
        if self.mib_s.is_empty() {
            return "-".into();
        }
        let rss = self.rss_mib.iter().cloned().fold(0.0, f64::max);
        let rss = if rss > 0.0 {
            format!(", {rss:.0} MiB")
        } else {
            String::new()
        };
        // Runs without a CPU figure (the upload phase, curl) record 0.
        let cpu = median(self.cpu_per_gib.clone());
        let cpu = if cpu > 0.0 {
            format!(", {cpu:.1} s/GiB")
        } else {
            String::new()
        };
        format!("{:.0} MiB/s{cpu}{rss}", median(self.mib_s.clone()))
    }

    fn median(&self) -> f64 {
        median(self.mib_s.clone())
    }
}

/// Runs every setting of `cfg` and prints the table and a `result:` line per setting.
pub async fn run(stack: &Stack, cfg: &Config) {
    let (size, reps) = (cfg.size, cfg.reps);
    let scratch = stack.dir.path().join("bench");
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    println!(
        "uplink-bench: {} MiB file, settings {:?} (part MiB, in flight), {reps} repetition(s), S3 at {}",
        size / MIB,
        cfg.settings,
        stack.env.s3_endpoint
    );
    println!(
        "\n| parts × in flight | agent, command → done | agent, upload phase | aws-cli | s5cmd | rclone | parallel curl |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut verdicts = Vec::new();
    for &(part_mib, concurrency) in &cfg.settings {
        let dev = stack.add_device(&options(part_mib, concurrency)).await;
        let target = Target {
            endpoint: &stack.env.s3_endpoint,
            part_mib,
            concurrency: concurrency as usize,
            wrapper: &[],
            timeout: Duration::from_secs(1800),
        };
        let (mut agent, mut phase, mut curl) = (Row::default(), Row::default(), Row::default());
        let mut tools: Vec<Row> = Tool::ALL.iter().map(|_| Row::default()).collect();
        let mut splits: Vec<Split> = Vec::new();
        // 0 = agent, 1..=3 = the tools, 4 = curl; each repetition starts one later.
        for rep in 0..reps {
            for k in 0..5 {
                match (rep + k) % 5 {
                    0 => {
                        let name = format!("bench-{}-{rep}.bin", size / MIB);
                        let m = agent_once(stack, &dev, size, &name).await;
                        agent.add(
                            size,
                            m.end_to_end,
                            m.cpu_secs,
                            m.peak_rss_kib,
                            m.server_cpu_secs,
                        );
                        phase.add(size, m.upload_phase, 0.0, 0, 0.0);
                        splits.push(m.split);
                    }
                    i @ 1..=3 => {
                        let tool = Tool::ALL[i - 1];
                        let file = crate::files::write_random_file(
                            &scratch.join(format!(
                                "{}-{part_mib}x{concurrency}-{rep}.bin",
                                tool.name()
                            )),
                            size,
                        )
                        .await;
                        let key =
                            format!("bench-baselines/{}/{}", tool.name(), uuid::Uuid::new_v4());
                        let m = super::upload(&stack.env, &scratch, tool, &file, &key, &target)
                            .await
                            .unwrap_or_else(|e| panic!("{} failed: {e}", tool.name()));
                        std::fs::remove_file(&file.path).ok();
                        tools[i - 1].add(
                            size,
                            m.secs,
                            m.cpu_secs,
                            m.peak_rss_kib,
                            m.server_cpu_secs,
                        );
                    }
                    _ => {
                        let file = stack
                            .source_file(&dev, &format!("curl-{rep}.bin"), size)
                            .await;
                        let (secs, server_cpu) =
                            curl_run(stack, &dev, &file, part_mib * MIB, concurrency as usize)
                                .await
                                .unwrap_or_else(|e| panic!("parallel curl failed: {e}"));
                        std::fs::remove_file(&file.path).ok();
                        curl.add(size, secs, 0.0, 0, server_cpu);
                    }
                }
            }
        }
        println!(
            "| {part_mib} MiB × {concurrency} | {} | {} | {} | {} | {} | {} |",
            agent.cell(),
            phase.cell(),
            tools[0].cell(),
            tools[1].cell(),
            tools[2].cell(),
            curl.cell()
        );
        let best = tools.iter().map(Row::median).fold(0.0, f64::max);
        let split = |f: fn(&Split) -> f64| median(splits.iter().map(f).collect());
        verdicts.push(format!(
            "{part_mib} MiB × {concurrency}: agent end to end / best of aws, s5cmd, rclone = {:.2} (goal ≥ 1.10); upload phase / curl = {:.2} (goal ≥ 0.95); agent CPU {:.2} s/GiB (goal ≤ 1.5)",
            agent.median() / best,
            phase.median() / curl.median(),
            median(agent.cpu_per_gib.clone()),
        ));
        verdicts.push(format!(
            "{part_mib} MiB × {concurrency}: agent's time, medians: command → session {:.2} s (delivery, planning, the hash of a file hashed first); parts {:.2} s (presigns, the hash pass beside the PUTs, the PUTs); completion {:.2} s (ListParts, CompleteMultipartUpload, checks); completed → done {:.2} s (the ack)",
            split(|s| s.to_session),
            split(|s| s.parts),
            split(|s| s.completion),
            split(|s| s.ack),
        ));
        verdicts.push(format!(
            "{part_mib} MiB × {concurrency}: S3 server CPU s/GiB while each uploads: agent {:.1}, aws-cli {:.1}, s5cmd {:.1}, rclone {:.1}, curl {:.1}",
            agent.server_cpu(),
            tools[0].server_cpu(),
            tools[1].server_cpu(),
            tools[2].server_cpu(),
            curl.server_cpu()
        ));
    }
    println!();
    for v in verdicts {
        println!("result: {v}");
    }
    println!(
        "MiB/s are medians over the repetitions; CPU is user + system seconds per GiB (GNU time for the tools, /proc/PID/stat for the agent); memory is the peak RSS. The upload phase and curl exclude hashing and planning."
    );
}
