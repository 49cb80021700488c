//! The proxy's faults against real TCP clients.

use super::*;

async fn echo_server() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.ok();
            });
        }
    });
    addr
}

/// Sends `data` through the proxy to the echo server and reads the echo until EOF, an
/// error or 2 s of silence. Returns the bytes back and the error, if any.
async fn exchange(proxy: &CountingProxy, data: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
    let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let (mut r, mut w) = conn.split();
    let write = async {
        // The write fails when the proxy cuts: that is expected.
        if w.write_all(data).await.is_ok() {
            w.shutdown().await.ok();
        }
    };
    let read = async {
        let mut back = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(2), r.read(&mut buf)).await {
                Err(_) => return (back, Some(std::io::ErrorKind::TimedOut.into())),
                Ok(Ok(0)) => return (back, None),
                Ok(Ok(n)) => back.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => return (back, Some(e)),
            }
        }
    };
    let ((), out) = tokio::join!(write, read);
    out
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_after_n_bytes_once_with_fin() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    proxy.set_faults(Faults::cut_once(100_000, false));
    let data = pattern(300_000);
    let (back, err) = exchange(&proxy, &data).await;
    assert!(
        err.as_ref()
            .is_none_or(|e| e.kind() != std::io::ErrorKind::TimedOut),
        "{err:?}"
    );
    assert!(back.len() <= 100_000, "{} bytes came back", back.len());
    assert_eq!(back[..], data[..back.len()]);
    assert_eq!(proxy.fault_counts().cuts, 1);
    // Only once: the next connection goes through whole.
    let (back, err) = exchange(&proxy, &data).await;
    assert!(err.is_none(), "{err:?}");
    assert!(back == data, "{} bytes back", back.len());
    assert_eq!(proxy.fault_counts().cuts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_every_second_connection() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    proxy.set_faults(Faults::cut_every(2, 50_000, true));
    let data = pattern(200_000);
    let mut reset = 0;
    for i in 1..=4 {
        let (back, err) = exchange(&proxy, &data).await;
        if i % 2 == 0 {
            let err = err.expect("a reset connection ends in an error");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
            assert!(back.len() <= 50_000);
            reset += 1;
        } else {
            assert!(err.is_none(), "connection {i}: {err:?}");
            assert!(back == data, "{} bytes back", back.len());
        }
    }
    assert_eq!(reset, 2);
    assert_eq!(proxy.fault_counts().resets, 2);
    assert_eq!(proxy.connections(), 4);
}

/// Writes `n` bytes of `pattern` on an open connection and reads their echo back.
async fn echo_on(conn: &mut TcpStream, n: usize) -> std::io::Result<Vec<u8>> {
    let data = pattern(n);
    conn.write_all(&data).await?;
    let mut back = vec![0u8; n];
    conn.read_exact(&mut back).await?;
    Ok(back)
}

/// The link reset counts every client's bytes together: neither connection alone sends
/// 100 kB, yet the one whose bytes cross each multiple of the total is reset there, and
/// only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_reset_hits_whichever_connection_crosses_each_multiple() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    // Bytes sent before the faults are set do not count.
    let (back, err) = exchange(&proxy, &pattern(70_000)).await;
    assert!(err.is_none() && back.len() == 70_000, "{err:?}");
    proxy.set_faults(Faults::reset_every_bytes(100_000));
    let base = proxy.bytes_sent();
    let mut a = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    assert_eq!(echo_on(&mut a, 60_000).await.unwrap(), pattern(60_000));
    // B's 60 kB cross 100 kB of the total after 40 kB: B is reset, A is not.
    let data = pattern(60_000);
    let (back, err) = exchange(&proxy, &data).await;
    let err = err.expect("the connection crossing 100 kB is reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err:?}");
    assert!(back.len() <= 40_000, "{} bytes back", back.len());
    assert_eq!(back[..], data[..back.len()]);
    assert_eq!(proxy.fault_counts().resets, 1);
    // A goes on up to just below 200 kB of the total, then crosses it.
    let below = (base + 200_000 - proxy.bytes_sent() - 1) as usize;
    assert_eq!(echo_on(&mut a, below).await.unwrap(), pattern(below));
    assert_eq!(proxy.fault_counts().resets, 1);
    let err = echo_on(&mut a, 10).await.expect_err("A crosses 200 kB");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
        ),
        "{err:?}"
    );
    assert_eq!(proxy.fault_counts().resets, 2);
    // Off again.
    proxy.clear_faults();
    let (back, err) = exchange(&proxy, &pattern(250_000)).await;
    assert!(err.is_none() && back.len() == 250_000, "{err:?}");
    assert_eq!(proxy.fault_counts().resets, 2);
}

/// Two clients sending at once, each opening a new connection after a reset until ten
/// exchanges went through whole: one reset per multiple of the total crossed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_reset_counts_the_total_of_concurrent_clients() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    proxy.set_faults(Faults::reset_every_bytes(100_000));
    let data = pattern(40_000);
    let client = || async {
        let (mut whole, mut reset) = (0, 0);
        while whole < 10 {
            match exchange(&proxy, &data).await {
                (back, None) => {
                    assert!(back == data, "{} bytes back", back.len());
                    whole += 1;
                }
                (back, Some(e)) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e:?}");
                    assert_eq!(back[..], data[..back.len()]);
                    reset += 1;
                }
            }
        }
        reset
    };
    let (r1, r2) = tokio::join!(client(), client());
    let sent = proxy.bytes_sent();
    assert!(sent >= 800_000, "{sent}");
    assert_eq!(r1 + r2, proxy.fault_counts().resets);
    assert_eq!(proxy.fault_counts().resets, sent / 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_an_open_connection_until_it_ends() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let mut buf = [0u8; 5];
    conn.write_all(b"hello").await.unwrap();
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    proxy.set_stalled(true);
    conn.write_all(b"again").await.unwrap();
    let silent = tokio::time::timeout(Duration::from_millis(500), conn.read_exact(&mut buf)).await;
    assert!(silent.is_err(), "nothing comes back while stalled");
    proxy.set_stalled(false);
    tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut buf))
        .await
        .expect("the held bytes arrive once the stall ends")
        .unwrap();
    assert_eq!(&buf, b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holes_a_seeded_fraction() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    proxy.seed(7);
    proxy.set_faults(Faults {
        black_hole: 0.5,
        ..Faults::default()
    });
    let data = pattern(10_000);
    let mut holed = 0;
    for _ in 0..8 {
        let (back, err) = exchange(&proxy, &data).await;
        match err {
            Some(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                assert!(back.is_empty());
                holed += 1;
            }
            None => assert!(back == data, "{} bytes back", back.len()),
            Some(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(holed, proxy.fault_counts().black_holed);
    assert!((1..8).contains(&holed), "{holed} of 8 black-holed");
    // The same seed picks the same connections.
    let again = CountingProxy::start(&echo_server().await.to_string()).await;
    again.seed(7);
    again.set_faults(Faults {
        black_hole: 0.5,
        ..Faults::default()
    });
    let picks: Vec<bool> = (1..=8).map(|n| again.shared.plan(n).black_hole).collect();
    assert_eq!(picks.iter().filter(|b| **b).count() as u64, holed);
    // Faults switch off at run time.
    proxy.clear_faults();
    let (back, err) = exchange(&proxy, &data).await;
    assert!(err.is_none(), "{err:?}");
    assert!(back == data, "{} bytes back", back.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupts_one_byte_of_the_kth_connection() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    proxy.set_faults(Faults {
        corrupt: Some(Corrupt {
            connection: 2,
            offset: 70_000,
        }),
        ..Faults::default()
    });
    let data = pattern(200_000);
    let (first, _) = exchange(&proxy, &data).await;
    assert!(first == data, "connection 1 is untouched");
    let (second, err) = exchange(&proxy, &data).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(second.len(), data.len());
    let diff: Vec<usize> = (0..data.len()).filter(|&i| second[i] != data[i]).collect();
    assert_eq!(diff, vec![70_000]);
    assert_eq!(proxy.fault_counts().corrupted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_connections_resets_open_ones() {
    let proxy = CountingProxy::start(&echo_server().await.to_string()).await;
    let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    conn.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await.unwrap();
    proxy.drop_connections();
    let r = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

/// An echo server behind the proxy: bytes are counted both ways and the rate holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_and_paces() {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.ok();
            });
        }
    });
    let proxy = CountingProxy::start(&echo_addr.to_string()).await;
    proxy.set_rate(Some(1 << 20));
    let mut conn = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
    let data = vec![7u8; 512 * 1024];
    let started = std::time::Instant::now();
    let (mut r, mut w) = conn.split();
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = tokio::join!(write, read);
    let took = started.elapsed();
    assert_eq!(back.len(), data.len());
    assert_eq!(proxy.bytes_sent(), data.len() as u64);
    assert_eq!(proxy.bytes_received(), data.len() as u64);
    assert_eq!(proxy.connections(), 1);
    // 512 KiB at 1 MiB/s: about half a second (the first chunk goes at once).
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
