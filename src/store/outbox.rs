//! The `outbox` table: commands for chat services, kept until a client acks them, and
//! the channel their changes are announced on. Every query of the table is here but
//! the journal's batch statement, which writes commands (and their acks) in the same
//! statement as the execution progress they belong to, so both commit together; it
//! announces on `COMMANDS_CHANNEL` in the `cmd` form read by `Announcement::parse`.

use super::accounts::Scope;
use super::{Store, StoreError};
use crate::wire::{Command, CommandId, CommandKind};
use uuid::Uuid;

/// The channel commands are announced on: `cmd <node> <chatbot id> <command id>` by
/// the journal when it commits a pending command, `ack <account id or *> <command id>`
/// by a node that heard a client ack a command it was not waiting for (the node that
/// waits may not have committed the command's row yet, so the ack travels either way).
pub const COMMANDS_CHANNEL: &str = "botflow_commands";

/// A notification of `COMMANDS_CHANNEL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// Node `node` committed a pending command for `chatbot_id`.
    Command { node: Uuid, chatbot_id: Uuid, command_id: String },
    /// A client acked this command through some node, with a key of this account
    /// (`None`: an operator key). The node waiting for the ack checks the account.
    Acked { command_id: String, account: Option<Uuid> },
}

impl Announcement {
    pub fn parse(payload: &str) -> Option<Announcement> {
        let mut parts = payload.splitn(4, ' ');
        match parts.next()? {
            "cmd" => {
                let node = parts.next()?.parse().ok()?;
                let chatbot_id = parts.next()?.parse().ok()?;
                let command_id = parts.next().filter(|c| !c.is_empty())?.to_string();
                Some(Announcement::Command { node, chatbot_id, command_id })
            }
            "ack" => {
                let first = parts.next()?;
                let rest: Vec<&str> = parts.collect();
                let (account, command_id) = match first {
                    "*" => (None, rest.join(" ")),
                    // A command id always holds a ':' and an account id never does.
                    id if !id.contains(':') => (Some(id.parse().ok()?), rest.join(" ")),
                    // `ack <command id>`, from a node of an earlier version: it acked the
                    // row after checking the account itself.
                    _ => (None, std::iter::once(first).chain(rest).collect::<Vec<_>>().join(" ")),
                };
                (!command_id.is_empty()).then_some(Announcement::Acked { command_id, account })
            }
            _ => None,
        }
    }
}

const COMMAND_COLUMNS: &str = "command_id, chatbot_id, conversation_id, kind, payload, execution_id";

fn command_of(r: &tokio_postgres::Row) -> Command {
    Command {
        command_id: r.get(0),
        chatbot_id: r.get(1),
        conversation_id: r.get(2),
        // The table only holds kinds this daemon wrote; an unknown one (from a newer
        // version) is delivered as a reply rather than dropped.
        kind: CommandKind::parse(&r.get::<_, String>(3)).unwrap_or(CommandKind::Reply),
        payload: r.get(4),
        execution_id: r.get(5),
    }
}

/// The commands still pending for these chatbots, oldest first, at most `limit`.
pub async fn pending(store: &Store, chatbots: &[Uuid], limit: i64) -> Result<Vec<Command>, StoreError> {
    let client = store.pool().get().await?;
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM outbox WHERE chatbot_id = ANY($1) AND status = 'pending' ORDER BY created_at LIMIT $2"
    );
    Ok(client.query(&sql, &[&chatbots, &limit]).await?.iter().map(command_of).collect())
}

/// The announced commands still pending, in the order announced. Each is read for the
/// announced chatbot: that is the one whose subscribers get it.
pub async fn announced(store: &Store, announced: &[(String, Uuid)]) -> Result<Vec<Command>, StoreError> {
    let (ids, chatbots): (Vec<&str>, Vec<Uuid>) = announced.iter().map(|(id, bot)| (id.as_str(), *bot)).unzip();
    let client = store.pool().get().await?;
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM outbox
         JOIN unnest($1::text[], $2::uuid[]) WITH ORDINALITY AS a(command_id, chatbot_id, n) USING (command_id, chatbot_id)
         WHERE status = 'pending' ORDER BY a.n"
    );
    Ok(client.query(&sql, &[&ids, &chatbots]).await?.iter().map(command_of).collect())
}

/// Whether a client acked the command (through any node).
pub async fn is_acked(store: &Store, command_id: &str) -> Result<bool, StoreError> {
    let client = store.pool().get().await?;
    let row = client.query_opt("SELECT status FROM outbox WHERE command_id = $1", &[&command_id]).await?;
    Ok(row.is_some_and(|r| r.get::<_, String>(0) == "acked"))
}

/// Which of these commands a client acked (through any node).
pub async fn acked_among(store: &Store, command_ids: &[String]) -> Result<Vec<String>, StoreError> {
    let client = store.pool().get().await?;
    let rows = client
        .query("SELECT command_id FROM outbox WHERE command_id = ANY($1) AND status = 'acked'", &[&command_ids])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records the ack of a command this node was not waiting for (it went out before a
/// restart, or another node runs its step) and announces it to the other nodes at
/// commit: when it acked the row, and when there is no row yet (the node that runs the
/// step may not have committed it, and checks the account itself). An ack of a row
/// already acked or of another account's row is not announced.
pub async fn ack_unwaited(store: &Store, command_id: &str, scope: Scope) -> Result<(), StoreError> {
    if CommandId::parse(command_id).is_none() {
        return Ok(()); // nothing this daemon ever sent
    }
    let client = store.pool().get().await?;
    // The main query sees the table as it was before the UPDATE.
    let announce = format!(
        "SELECT pg_notify('{COMMANDS_CHANNEL}', $2)
         WHERE EXISTS (SELECT FROM acked) OR NOT EXISTS (SELECT FROM outbox WHERE command_id = $1)"
    );
    match scope {
        Scope::All => {
            let sql = format!(
                "WITH acked AS (UPDATE outbox SET status = 'acked', acked_at = now()
                                WHERE command_id = $1 AND status = 'pending' RETURNING 1) {announce}"
            );
            client.execute(&sql, &[&command_id, &format!("ack * {command_id}")]).await?
        }
        Scope::Account(account) => {
            let sql = format!(
                "WITH acked AS (UPDATE outbox o SET status = 'acked', acked_at = now() FROM chatbots c
                                WHERE o.command_id = $1 AND o.status = 'pending' AND c.id = o.chatbot_id
                                  AND c.account_id = $3 RETURNING 1) {announce}"
            );
            client.execute(&sql, &[&command_id, &format!("ack {account} {command_id}"), &account]).await?
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_notifications_are_read_whole_and_bad_ones_refused() {
        let (node, bot) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(
            Announcement::parse(&format!("cmd {node} {bot} 3f2a:say hi")),
            Some(Announcement::Command { node, chatbot_id: bot, command_id: "3f2a:say hi".into() })
        );
        assert_eq!(
            Announcement::parse("ack * 3f2a:say hi"),
            Some(Announcement::Acked { command_id: "3f2a:say hi".into(), account: None })
        );
        assert_eq!(
            Announcement::parse(&format!("ack {bot} 3f2a:x")),
            Some(Announcement::Acked { command_id: "3f2a:x".into(), account: Some(bot) })
        );
        assert_eq!(
            Announcement::parse("ack 3f2a:x"),
            Some(Announcement::Acked { command_id: "3f2a:x".into(), account: None }),
            "the form of earlier versions"
        );
        for bad in ["", "cmd", "ack", "ack ", "ack * ", "ack nope 3f2a:x", "cmd x y z", &format!("cmd {node} {bot}"), &format!("cmd {node} {bot} "), "nope 1"] {
            assert_eq!(Announcement::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_journal_announces_commands_on_the_channel_listened_to() {
        assert!(super::super::journal::WRITE_SQL.contains(&format!("pg_notify('{COMMANDS_CHANNEL}', 'cmd '")));
    }
}
