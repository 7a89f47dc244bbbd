#!/bin/sh
# Create the broker users of the image service, each with the least privilege it needs, on
# one vhost. Run it where `rabbitmqctl` reaches the broker (on a node, as root or rabbitmq):
#
#   IMAGE_SERVICE_PASSWORD=... BACKUP_AGENT_PASSWORD=... IMAGE_CLI_PASSWORD=... \
#       deploy/rabbitmq/setup-users.sh [--vhost images] [--namespace image]
#
# A password that is not given is generated and printed once. Idempotent: the vhost and the
# users are created when missing, passwords are (re)set when given, permissions always set.
# Environment: IMAGE_VHOST (default images), IMAGE_NAMESPACE (default image), RABBITMQCTL
# (default rabbitmqctl; e.g. "rabbitmqctl -n rabbit@rabbitmq" from another container).
#
# What each user may touch (NS = the namespace; see docs/PROTOCOL.md and deploy/README.md):
#   image-service  declares NS.api, NS.results, NS.heartbeats, NS.volume-events, NS.dead,
#                  NS.agent.*, NS.events; consumes its queues; publishes replies and agent
#                  commands (default exchange) and events (NS.events: image.*, backupStorage.*).
#   backup-agent   declares NS.results, NS.heartbeats, NS.dead, NS.events and its NS.agent.<uuid>;
#                  consumes NS.agent.<uuid>; publishes results and heartbeats (default exchange)
#                  and progress events (NS.events: image.progress.* only).
#   image-cli      declares its own server-named reply queue (amq.gen-*) and NS.events; publishes
#                  API requests to the default exchange; binds to NS.events for progress.
set -eu

VHOST="${IMAGE_VHOST:-images}"
NS="${IMAGE_NAMESPACE:-image}"
RABBITMQCTL="${RABBITMQCTL:-rabbitmqctl}"

while [ $# -gt 0 ]; do
    case "$1" in
        --vhost) VHOST="$2"; shift 2 ;;
        --namespace) NS="$2"; shift 2 ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "setup-users.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

ctl() {
    # shellcheck disable=SC2086  # RABBITMQCTL may carry options, e.g. -n rabbit@host
    $RABBITMQCTL -q "$@"
}

# The namespace as a regular expression that matches only itself.
# shellcheck disable=SC2016  # the $ in the sed expression is a regex character
N="$(printf '%s' "$NS" | sed 's/[][\\.*^$()+?{}|]/\\&/g')"

generate_password() {
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

if ! ctl list_vhosts --no-table-headers name | grep -qxF "$VHOST"; then
    echo "creating vhost $VHOST"
    ctl add_vhost "$VHOST"
fi

# user NAME PASSWORD_VARIABLE CONFIGURE WRITE READ
user() {
    name="$1"
    eval "password=\${$2:-}"
    if ctl list_users --no-table-headers | cut -f1 | grep -qxF "$name"; then
        if [ -n "$password" ]; then
            ctl change_password "$name" "$password" >/dev/null
            echo "user $name: password changed"
        else
            echo "user $name: exists (password unchanged; set $2 to change it)"
        fi
    else
        if [ -z "$password" ]; then
            password="$(generate_password)"
            echo "user $name: created with password $password  (keep it: it is not shown again)"
        else
            echo "user $name: created"
        fi
        ctl add_user "$name" "$password" >/dev/null
    fi
    ctl set_permissions -p "$VHOST" "$name" "$3" "$4" "$5" >/dev/null
    echo "  on vhost $VHOST: configure '$3' write '$4' read '$5'"
}

# topic NAME WRITE READ: which routing keys NAME may publish to / bind on NS.events.
topic() {
    ctl set_topic_permissions -p "$VHOST" "$1" "$NS.events" "$2" "$3" >/dev/null
    echo "  on exchange $NS.events: publish keys '$2' bind keys '$3'"
}

# queue.declare of a queue with a dead-letter exchange needs write on that exchange and read on
# the queue; queue.bind needs write on the queue and read on the exchange; publishing to the
# default exchange needs write on amq.default.
user image-service IMAGE_SERVICE_PASSWORD \
    "^$N\\.(api|results|heartbeats|volume-events|events|dead|agent\\..+)\$" \
    "^(amq\\.default|$N\\.(events|dead|volume-events))\$" \
    "^$N\\.(api|results|heartbeats|volume-events|events|dead|agent\\..+)\$"
topic image-service '^(image|backupStorage)\.' '^(volume|volumeSnapshot)\.'

user backup-agent BACKUP_AGENT_PASSWORD \
    "^$N\\.(results|heartbeats|events|dead|agent\\..+)\$" \
    "^(amq\\.default|$N\\.(events|dead))\$" \
    "^$N\\.(results|dead|agent\\..+)\$"
topic backup-agent '^image\.progress\.' '^$'

user image-cli IMAGE_CLI_PASSWORD \
    "^(amq\\.gen-.*|$N\\.events)\$" \
    "^(amq\\.default|amq\\.gen-.*)\$" \
    "^(amq\\.gen-.*|$N\\.events)\$"
topic image-cli '^$' '.*'

echo "done. Connection urls: amqp://USER:PASSWORD@HOST:5672/$VHOST"
