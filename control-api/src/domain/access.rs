//! Who may do what. An operator call is made by a [`Principal`]: the bootstrap
//! `operator_token` (an admin of every project) or an API key with a role, scoped to one
//! project or to all of them.
//!
//! | need | viewer | operator | admin | what needs it |
//! |---|---|---|---|---|
//! | `Read` | yes | yes | yes | every `GET` |
//! | `Operate` | | yes | yes | devices, commands, pause/resume/abort, datasets (create, seal) |
//! | `Admin` | | | yes | API keys, storage policies, project name |
//! | `Global` | | | unscoped admin | projects (create, quota), unscoped keys |

use serde::{Deserialize, Serialize};

#[derive(
    utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Read,
    Operate,
    Admin,
    /// Admin of every project (an unscoped admin key or the bootstrap token).
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// For the audit log: `operator` (bootstrap token) or `key:{key_id}`.
    pub name: String,
    pub role: Role,
    /// `None`: every project.
    pub project: Option<String>,
}

/// Why a call is refused: the project is invisible (answered as 404, so other projects'
/// names do not leak) or visible but the role is too low (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    NotVisible,
    Forbidden,
}

impl Principal {
    pub fn bootstrap() -> Principal {
        Principal {
            name: "operator".into(),
            role: Role::Admin,
            project: None,
        }
    }

    /// Whether the principal can see `project` at all.
    pub fn sees(&self, project: &str) -> bool {
        self.project.as_deref().is_none_or(|p| p == project)
    }

    /// Checks `need` on `project` (`None`: a call that belongs to no project).
    pub fn check(&self, project: Option<&str>, need: Need) -> Result<(), Denied> {
        if let Some(p) = project {
            if !self.sees(p) {
                return Err(Denied::NotVisible);
            }
        }
        let ok = match need {
            Need::Read => true,
            Need::Operate => self.role >= Role::Operator,
            Need::Admin => self.role == Role::Admin,
            Need::Global => self.role == Role::Admin && self.project.is_none(),
        };
        // A project-less call that a scoped key may not make is forbidden, not invisible.
        if ok && (project.is_some() || self.project.is_none() || need == Need::Read) {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }

    /// The projects whose rows a listing may show (`None`: all).
    pub fn visible(&self) -> Option<&str> {
        self.project.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role, project: Option<&str>) -> Principal {
        Principal {
            name: "key:x".into(),
            role,
            project: project.map(str::to_string),
        }
    }

    #[test]
    fn the_matrix() {
        use Denied::*;
        use Need::*;
        let viewer = key(Role::Viewer, Some("a"));
        let operator = key(Role::Operator, Some("a"));
        let admin = key(Role::Admin, Some("a"));
        let global = key(Role::Admin, None);
        let global_viewer = key(Role::Viewer, None);
        let cases = [
            (&viewer, Some("a"), Read, Ok(())),
            (&viewer, Some("a"), Operate, Err(Forbidden)),
            (&viewer, Some("b"), Read, Err(NotVisible)),
            (&operator, Some("a"), Operate, Ok(())),
            (&operator, Some("a"), Admin, Err(Forbidden)),
            (&operator, Some("b"), Operate, Err(NotVisible)),
            (&admin, Some("a"), Admin, Ok(())),
            (&admin, Some("a"), Global, Err(Forbidden)),
            (&admin, Some("b"), Admin, Err(NotVisible)),
            (&admin, None, Global, Err(Forbidden)),
            (&admin, None, Read, Ok(())),
            (&global, Some("b"), Admin, Ok(())),
            (&global, None, Global, Ok(())),
            (&global_viewer, Some("b"), Read, Ok(())),
            (&global_viewer, Some("b"), Operate, Err(Forbidden)),
            (&global_viewer, None, Global, Err(Forbidden)),
        ];
        for (p, project, need, want) in cases {
            assert_eq!(
                p.check(project, need),
                want,
                "{:?} {:?} on {project:?}",
                p.role,
                need
            );
        }
        assert!(Principal::bootstrap().check(None, Global).is_ok());
    }
}
