//! Join tokens (`dsctl tokens create|list|revoke`): the catalog's `tokens`
//! table and the one decision whether a token may enroll an agent. Only the
//! secret's SHA-256 is stored; the secret is shown once, when created.
//! Taking a use is one transaction: two agents racing for a token's last use
//! cannot both get it.

use rusqlite::{params, OptionalExtension, Row};

use crate::catalog::{Catalog, CatalogError};

pub(crate) const MIGRATIONS: &[(u32, &str)] = &[
    // 16: join tokens
    (
        16,
        "CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        targets TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        uses_allowed INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        revoked_at INTEGER,
        last_used_at INTEGER,
        agents TEXT NOT NULL DEFAULT '[]'
    );",
    ),
];

/// A token as stored (without its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub targets: Vec<String>,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: i64,
    /// 0: any number
    pub uses_allowed: u32,
    pub uses: u32,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
    /// names of the agents enrolled with it, oldest first
    pub agents: Vec<String>,
}

/// Why a token cannot enroll an agent: each a line the agent prints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("join token {0} is not known to this coordinator (or its secret is wrong): create one with `dsctl tokens create`")]
    Unknown(String),
    #[error("join token {id} was revoked at {at}: create a new one with `dsctl tokens create`")]
    Revoked { id: String, at: String },
    #[error("join token {id} expired at {at}: create a new one with `dsctl tokens create`")]
    Expired { id: String, at: String },
    #[error("join token {id} is used up ({uses} of {uses} uses): create a new one with `dsctl tokens create`")]
    UsedUp { id: String, uses: u32 },
    #[error("join token {id} does not allow target {target} (it allows {allowed}): create a token with `dsctl tokens create --target {target}`")]
    Target {
        id: String,
        target: String,
        allowed: String,
    },
}

fn at(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| unix.to_string())
}

/// Whether `t` may enroll an agent serving `targets` at `now`.
pub fn check(t: &TokenRecord, targets: &[String], now: i64) -> Result<(), Refused> {
    if let Some(r) = t.revoked_at {
        return Err(Refused::Revoked {
            id: t.id.clone(),
            at: at(r),
        });
    }
    if now >= t.expires_at {
        return Err(Refused::Expired {
            id: t.id.clone(),
            at: at(t.expires_at),
        });
    }
    if t.uses_allowed > 0 && t.uses >= t.uses_allowed {
        return Err(Refused::UsedUp {
            id: t.id.clone(),
            uses: t.uses_allowed,
        });
    }
    for target in targets {
        if !t
            .targets
            .iter()
            .any(|p| datasaver_common::names::pattern_matches(p, target))
        {
            return Err(Refused::Target {
                id: t.id.clone(),
                target: target.clone(),
                allowed: t.targets.join(", "),
            });
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

const COLUMNS: &str = "id, targets, created_at, created_by, expires_at, uses_allowed, uses, \
     revoked_at, last_used_at, agents";

fn from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    let list = |s: String| serde_json::from_str::<Vec<String>>(&s).unwrap_or_default();
    Ok(TokenRecord {
        id: r.get(0)?,
        targets: list(r.get(1)?),
        created_at: r.get(2)?,
        created_by: r.get(3)?,
        expires_at: r.get(4)?,
        uses_allowed: r.get::<_, i64>(5)? as u32,
        uses: r.get::<_, i64>(6)? as u32,
        revoked_at: r.get(7)?,
        last_used_at: r.get(8)?,
        agents: list(r.get(9)?),
    })
}

fn json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

#[derive(Clone)]
pub struct TokenStore {
    db: Catalog,
}

impl TokenStore {
    pub fn new(db: Catalog) -> Self {
        Self { db }
    }

    /// Stores a new token with the hash of its secret.
    pub async fn create(
        &self,
        t: TokenRecord,
        secret_sha256: String,
    ) -> Result<TokenRecord, CatalogError> {
        let row = t.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO tokens(id, secret_sha256, targets, created_at, created_by, expires_at, uses_allowed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        row.id,
                        secret_sha256,
                        json(&row.targets),
                        row.created_at,
                        row.created_by,
                        row.expires_at,
                        i64::from(row.uses_allowed)
                    ],
                )?;
                Ok(())
            })
            .await?;
        Ok(t)
    }

    /// Every token, newest first.
    pub async fn list(&self) -> Result<Vec<TokenRecord>, CatalogError> {
        self.db
            .call(|c| {
                let mut st = c.prepare(&format!(
                    "SELECT {COLUMNS} FROM tokens ORDER BY created_at DESC, id"
                ))?;
                let rows = st.query_map([], from_row)?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await
    }

    /// Revokes a token (kept, so the list shows it); `None` when unknown.
    pub async fn revoke(&self, id: &str, now: i64) -> Result<Option<TokenRecord>, CatalogError> {
        let id = id.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                    params![id, now],
                )?;
                Ok(c.query_row(
                    &format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"),
                    [&id],
                    from_row,
                )
                .optional()?)
            })
            .await
    }

    /// Takes one use of token `id` for agent `agent` serving `targets`, if
    /// the secret matches and [`check`] allows it.
    pub async fn take_use(
        &self,
        id: &str,
        secret: &str,
        agent: &str,
        targets: &[String],
        now: i64,
    ) -> Result<TokenRecord, TokenError> {
        let (id, secret, agent, targets) = (
            id.to_string(),
            secret.to_string(),
            agent.to_string(),
            targets.to_vec(),
        );
        self.db
            .call(move |c| {
                let tx = c.unchecked_transaction()?;
                let found = tx
                    .query_row(
                        &format!("SELECT {COLUMNS}, secret_sha256 FROM tokens WHERE id = ?1"),
                        [&id],
                        |r| Ok((from_row(r)?, r.get::<_, String>(10)?)),
                    )
                    .optional()?;
                let Some((mut t, hash)) = found else {
                    return Ok(Err(Refused::Unknown(id)));
                };
                if !datasaver_common::enroll::secret_matches(&secret, &hash) {
                    return Ok(Err(Refused::Unknown(id)));
                }
                if let Err(r) = check(&t, &targets, now) {
                    return Ok(Err(r));
                }
                t.uses += 1;
                t.last_used_at = Some(now);
                t.agents.push(agent);
                tx.execute(
                    "UPDATE tokens SET uses = ?2, last_used_at = ?3, agents = ?4 WHERE id = ?1",
                    params![t.id, i64::from(t.uses), now, json(&t.agents)],
                )?;
                tx.commit()?;
                Ok(Ok(t))
            })
            .await?
            .map_err(TokenError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(uses_allowed: u32) -> TokenRecord {
        TokenRecord {
            id: "0123456789ab".into(),
            targets: vec!["app".into(), "shop-*".into()],
            created_at: 100,
            created_by: "admin".into(),
            expires_at: 1000,
            uses_allowed,
            uses: 0,
            revoked_at: None,
            last_used_at: None,
            agents: vec![],
        }
    }

    #[tokio::test]
    async fn a_token_enrolls_only_what_it_allows_and_only_as_often() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(Catalog::open(&dir.path().join("c.db")).unwrap());
        let hash = datasaver_common::enroll::sha256_hex(b"s3cret");
        store.create(token(2), hash).await.unwrap();
        let take = |secret: &'static str, target: &'static str, now: i64| {
            let store = store.clone();
            async move {
                store
                    .take_use(
                        "0123456789ab",
                        secret,
                        "agent-x",
                        &[target.to_string()],
                        now,
                    )
                    .await
            }
        };
        // wrong secret, wrong target: refused, no use taken
        assert!(matches!(
            take("nope", "app", 200).await,
            Err(TokenError::Refused(Refused::Unknown(_)))
        ));
        let e = take("s3cret", "other", 200).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("does not allow target other (it allows app, shop-*)"),
            "{e}"
        );
        let t = take("s3cret", "shop-eu", 200).await.unwrap();
        assert_eq!((t.uses, t.agents.clone()), (1, vec!["agent-x".to_string()]));
        take("s3cret", "app", 300).await.unwrap();
        let e = take("s3cret", "app", 300).await.unwrap_err();
        assert!(e.to_string().contains("is used up (2 of 2 uses)"), "{e}");

        let mut other = token(0);
        other.id = "ba9876543210".into();
        store
            .create(other, datasaver_common::enroll::sha256_hex(b"x"))
            .await
            .unwrap();
        let e = store
            .take_use("ba9876543210", "x", "a", &["app".into()], 1000)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("expired at 1970-01-01 00:16:40 UTC"),
            "{e}"
        );
        let r = store.revoke("ba9876543210", 500).await.unwrap().unwrap();
        assert_eq!(r.revoked_at, Some(500));
        let e = store
            .take_use("ba9876543210", "x", "a", &["app".into()], 600)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("was revoked at"), "{e}");
        assert!(store.revoke("nothere", 1).await.unwrap().is_none());
        let all = store.list().await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].uses, 2);
    }
}
