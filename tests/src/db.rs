//! One fresh PostgreSQL database per test.

use sqlx::{Connection, PgConnection};

/// A database made for one test; dropped (with `WITH (FORCE)`) when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// URL the control API uses (owner role `uplink` when the cluster has it).
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create(admin_url: &str) -> TestDatabase {
        let name = format!(
            "uplink_e2e_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        );
        let mut conn = PgConnection::connect(admin_url).await.unwrap_or_else(|e| {
            panic!(
                "could not connect to UPLINK_TEST_DATABASE_URL={admin_url}: {e} \
                 (is the stack from `scripts/test` running?)"
            )
        });
        let has_uplink_role: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'uplink')")
                .fetch_one(&mut conn)
                .await
                .expect("query pg_roles");
        let owner = if has_uplink_role { " OWNER uplink" } else { "" };
        sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\"{owner}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        conn.close().await.ok();

        let mut url = url::Url::parse(admin_url).expect("UPLINK_TEST_DATABASE_URL is a URL");
        if has_uplink_role {
            url.set_username("uplink").expect("set user");
            url.set_password(None).expect("clear password");
        }
        url.set_path(&format!("/{name}"));
        TestDatabase {
            name,
            url: url.to_string(),
            admin_url: admin_url.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if std::env::var("UPLINK_TEST_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping database {}", self.name);
            return;
        }
        // Drop runs inside the test's runtime: use a thread with its own runtime.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin_url).await.ok()?;
                sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()?;
                conn.close().await.ok()
            })
        });
        if handle.join().ok().flatten().is_none() {
            eprintln!("note: could not drop test database {}", self.name);
        }
    }
}
