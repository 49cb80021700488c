//! The harness's own plumbing against the dev stack: a database per test, and signed S3
//! requests (these need no service binaries).

use sqlx::{Connection, PgConnection};
use uplink_e2e::db::TestDatabase;
use uplink_e2e::env::TestEnv;
use uplink_e2e::files::{s3_download, sha256_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_test_gets_its_own_database() {
    let env = TestEnv::from_env();
    let db = TestDatabase::create(&env.database_url).await;
    let name = db.name.clone();
    {
        let mut conn = PgConnection::connect(&db.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", db.url));
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(current, name);
        sqlx::raw_sql("CREATE TABLE t (x int)")
            .execute(&mut conn)
            .await
            .expect("the test database's user can create tables");
        conn.close().await.ok();
    }
    drop(db);
    let mut admin = PgConnection::connect(&env.database_url).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!exists, "database {name} was not dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_downloads_are_signed_and_checked() {
    let mut env = TestEnv::from_env();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("missing");
    let code = s3_download(&env, &env.s3_bucket, "no/such/key", &dest).await;
    assert_eq!(code, 404, "a missing object with the right key is 404");
    env.s3_secret_key.push('x');
    let code = s3_download(&env, &env.s3_bucket, "no/such/key", &dest).await;
    assert_eq!(code, 403, "a bad signature must be refused");
    let (sha, _) = sha256_file(&dest);
    assert_eq!(sha.len(), 64);
}
