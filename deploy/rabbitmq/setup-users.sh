#!/bin/sh
# The broker users of the image service, each with the least privilege it needs, on one vhost
# (contract section 8; deploy/README.md section 1). Run it where `rabbitmqctl` reaches the
# broker (on a node, as root or rabbitmq):
#
#   deploy/rabbitmq/setup-users.sh [init]             the vhost, image-service and image-cli
#   deploy/rabbitmq/setup-users.sh add-agent UUID     enrol one storage host: its own user
#   deploy/rabbitmq/setup-users.sh remove-agent UUID  a host is retired or compromised
#
# Options (or environment): --vhost V (IMAGE_VHOST, default images), --namespace NS
# (IMAGE_NAMESPACE, default image), --user-prefix P (IMAGE_USER_PREFIX, default empty: the
# users are P+image-service, P+image-cli, P+backup-agent-UUID), --external (IMAGE_EXTERNAL=1:
# users get no password and log in with a client certificate naming them, RabbitMQ's EXTERNAL
# mechanism). RABBITMQCTL (default rabbitmqctl; e.g. "rabbitmqctl -n rabbit@rabbitmq").
#
# Passwords come from IMAGE_SERVICE_PASSWORD, IMAGE_CLI_PASSWORD and BACKUP_AGENT_PASSWORD;
# one that is not given is generated and printed once. Idempotent: what is missing is created,
# passwords are (re)set only when given, permissions are always set.
#
# What each user may do (NS = the namespace):
#   image-service        declares and consumes NS.api, NS.results, NS.heartbeats,
#                        NS.volume-events and NS.dead; declares the exchanges and every
#                        NS.agent.<uuid>; publishes replies and commands (default exchange) and
#                        image.* / backupStorage.* events on NS.events; binds volume.* /
#                        volumeSnapshot.* from NS.events.
#   backup-agent-UUID    declares and consumes only NS.agent.UUID; publishes its results and
#                        heartbeats on NS.agents under result.UUID and heartbeat.UUID only, and
#                        image.progress.* on NS.events. It may not publish to the default
#                        exchange at all: other agents' queues, NS.results, NS.heartbeats and the
#                        API queue are out of its reach, for reading and for writing.
#   image-cli            its own server-named reply queues (amq.gen-*); publishes API requests
#                        (default exchange); binds to NS.events for progress.
# The default exchange reaches every queue, so what a client sends there is told apart by its
# broker-validated user_id: agents take commands only from image-service; the service takes
# results and heartbeats only from NS.agents, for a backup storage only from the user of its
# first heartbeat.
set -eu

VHOST="${IMAGE_VHOST:-images}"
NS="${IMAGE_NAMESPACE:-image}"
PREFIX="${IMAGE_USER_PREFIX:-}"
EXTERNAL="${IMAGE_EXTERNAL:-0}"
RABBITMQCTL="${RABBITMQCTL:-rabbitmqctl}"
ACTION=init
AGENT=""

usage() { sed -n '2,32p' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        init) ACTION=init; shift ;;
        add-agent|remove-agent)
            [ $# -ge 2 ] || { echo "setup-users.sh: $1 needs the backup storage's uuid" >&2; exit 2; }
            ACTION="$1"; AGENT="$2"; shift 2 ;;
        --vhost|--namespace|--user-prefix)
            [ $# -ge 2 ] || { echo "setup-users.sh: $1 needs a value" >&2; exit 2; }
            case "$1" in
                --vhost) VHOST="$2" ;;
                --namespace) NS="$2" ;;
                --user-prefix) PREFIX="$2" ;;
            esac
            shift 2 ;;
        --external) EXTERNAL=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup-users.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -n "$AGENT" ] && ! printf '%s' "$AGENT" | grep -qxE '[0-9a-f]{32}'; then
    echo "setup-users.sh: a backup storage uuid is 32 lowercase hex characters, not $AGENT" >&2
    exit 2
fi

ctl() {
    # shellcheck disable=SC2086  # RABBITMQCTL may carry options, e.g. -n rabbit@host
    $RABBITMQCTL -q "$@"
}

# A name as a regular expression that matches only itself.
quote() { printf '%s' "$1" | sed 's/[][\\.*^$()+?{}|]/\\&/g'; }
N="$(quote "$NS")"
SERVICE_USER="${PREFIX}image-service"
CLI_USER="${PREFIX}image-cli"
AGENT_USER="${PREFIX}backup-agent-${AGENT}"

generate_password() {
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

# Passwords go to rabbitmqctl on its standard input, never on a command line (where `ps`
# would show them).
add_user() { printf '%s\n' "$2" | ctl add_user "$1" >/dev/null; }
change_password() { printf '%s\n' "$2" | ctl change_password "$1" >/dev/null; }

user_exists() {
    ctl list_users --no-table-headers | cut -f1 | grep -qxF "$1"
}

# user NAME PASSWORD_VARIABLE CONFIGURE WRITE READ
user() {
    name="$1"
    eval "password=\${$2:-}"
    if user_exists "$name"; then
        if [ "$EXTERNAL" = 1 ]; then
            ctl clear_password "$name" >/dev/null
            echo "user $name: exists (no password: certificate login)"
        elif [ -n "$password" ]; then
            change_password "$name" "$password"
            echo "user $name: password changed"
        else
            echo "user $name: exists (password unchanged; set $2 to change it)"
        fi
    else
        if [ "$EXTERNAL" = 1 ]; then
            add_user "$name" "$(generate_password)"
            ctl clear_password "$name" >/dev/null
            echo "user $name: created without a password (its client certificate's CN: $name)"
        elif [ -z "$password" ]; then
            password="$(generate_password)"
            add_user "$name" "$password"
            echo "user $name: created with password $password  (keep it: it is not shown again)"
        else
            add_user "$name" "$password"
            echo "user $name: created"
        fi
    fi
    ctl set_permissions -p "$VHOST" "$name" "$3" "$4" "$5" >/dev/null
    echo "  on vhost $VHOST: configure '$3' write '$4' read '$5'"
}

# topic NAME WRITE READ: which routing keys NAME may publish to / bind on NS.events.
topic() {
    ctl set_topic_permissions -p "$VHOST" "$1" "$NS.events" "$2" "$3" >/dev/null
    echo "  on exchange $NS.events: publish keys '$2' bind keys '$3'"
}

# queue.declare of a queue with a dead-letter exchange needs configure and read on the queue and
# write on that exchange; queue.bind needs write on the queue and read on the exchange;
# publishing to the default exchange needs write on amq.default.
case "$ACTION" in
init)
    if ! ctl list_vhosts --no-table-headers name | grep -qxF "$VHOST"; then
        echo "creating vhost $VHOST"
        ctl add_vhost "$VHOST"
    fi
    user "$SERVICE_USER" IMAGE_SERVICE_PASSWORD \
        "^$N\\.(api|results|heartbeats|volume-events|events|agents|dead|agent\\.[0-9a-f]{32})\$" \
        "^(amq\\.default|$N\\.(events|dead|volume-events|results|heartbeats))\$" \
        "^$N\\.(api|results|heartbeats|volume-events|events|agents|dead|agent\\.[0-9a-f]{32})\$"
    topic "$SERVICE_USER" '^(image|backupStorage)\.' '^(volume|volumeSnapshot)\.'
    user "$CLI_USER" IMAGE_CLI_PASSWORD \
        "^amq\\.gen-.*\$" \
        "^(amq\\.default|amq\\.gen-.*)\$" \
        "^(amq\\.gen-.*|$N\\.events)\$"
    topic "$CLI_USER" '^$' '.*'
    # Agents may publish to NS.dead (declaring a queue with a dead-letter exchange needs it)
    # and nothing consumes it: a length cap keeps it from filling the disk.
    ctl set_policy -p "$VHOST" --apply-to queues "$NS-dead-cap" "^$N\\.dead\$" \
        '{"max-length": 100000, "overflow": "drop-head"}' >/dev/null
    echo "policy $NS-dead-cap: at most 100000 messages in $NS.dead"
    echo "done. Start image-service with"
    echo "  --agent-user-pattern '^$(quote "$PREFIX")backup-agent-[0-9a-f]{32}\$'"
    echo "so that only enrolled agents register backup storages; enrol each with add-agent UUID."
    ;;
add-agent)
    user "$AGENT_USER" BACKUP_AGENT_PASSWORD \
        "^$N\\.agent\\.$AGENT\$" \
        "^$N\\.(agents|events|dead)\$" \
        "^$N\\.agent\\.$AGENT\$"
    topic "$AGENT_USER" '^image\.progress\.' '^$'
    ctl set_topic_permissions -p "$VHOST" "$AGENT_USER" "$NS.agents" \
        "^(result|heartbeat)\\.$AGENT\$" '^$' >/dev/null
    echo "  on exchange $NS.agents: publish keys '^(result|heartbeat)\\.$AGENT\$' only"
    echo "done. Start the agent with --backup-storage-uuid $AGENT --service-user $SERVICE_USER"
    echo "  and IMAGE_AMQP_URL=amqp(s)://$AGENT_USER:PASSWORD@HOST/$VHOST"
    ;;
remove-agent)
    if user_exists "$AGENT_USER"; then
        # Deleting a user closes its connections: the host can neither read commands nor
        # publish from now on.
        ctl delete_user "$AGENT_USER" >/dev/null
        echo "user $AGENT_USER: deleted (its connections are closed)"
    else
        echo "user $AGENT_USER: not found"
    fi
    echo "now: image-cli DeleteBackupStorage uuid=$AGENT"
    ;;
esac
