#!/bin/bash
# Throwaway Samba 4.17 AD DC (LDAP only) for coexist tests.  Debian packages: samba, samba-ad-dc,
# samba-ad-provision, samba-dsdb-modules, ldb-tools (+ ldap-utils only for the checks).  Run as root.
#
# Usage: recipe.sh <step> [args]     (steps are NOT idempotent; they print nothing on success
#                                     unless noted; exit status != 0 on failure)
#   template  DIR                    provision + conf + schema + svc account + grants + lockout policy
#   provision DIR                    samba-tool domain provision into DIR (~4-6 s)
#   conf      DIR IP                 (re)write DIR/etc/smb.conf for IP (absolute paths, must be redone after cp)
#   schema    DIR                    Exchange attrs targetAddress + msExchRecipientTypeDetails (offline)
#   svc       DIR                    create $SVC_NAME with $SVC_PASS (offline) + grants (see GRANT_*)
#   lockout   DIR THRESHOLD SECONDS  lockout policy (offline); SECONDS may be < 60
#   grant-deleted DIR [online]       only the Deleted Objects grant (svc does it already); online = via ldap_priv
#   users     DIR N [FIRST]          add N mail users (offline, ~0.5 s per 200, ~2.5 s per 1000)
#   clone     TEMPLATE DIR IP        cp -a TEMPLATE DIR, rewrite conf for IP
#   new-invocation-id DIR [UUID]     give the (stopped) DC a new invocationId ("restored DC")
#   pki       DIR [IP] [DNSNAME]     test CA + server cert (EC P-256) into DIR
#   run       DIR                    exec samba in the foreground (for Command::spawn); stdin must be a pipe
#   wait      IP [SECONDS]           poll until rootDSE answers on ldap://IP
# All offline steps require samba for DIR to be stopped.
#
# Environment (defaults):
#   REALM=CORP.TEST DOMAIN=CORP ADMIN_PASS='Passw0rd!Adm1n' HOSTNAME_DC=dc
#   SVC_NAME=svc-coexist SVC_PASS='Svc-Passw0rd!'
#   STRONG_AUTH=no        'no'  -> simple binds allowed on plain ldap://
#                         'yes' -> Samba default: plain simple bind -> 8 strongerAuthRequired
#   TLS=files|none|auto   files: use $TLS_DIR/{dc.key,dc.pem,ca.pem} (run 'pki' first); none: no 636/StartTLS;
#                         auto: Samba self-signs into DIR/private/tls at first start (~2 s extra, once)
#   TLS_DIR=<DIR>/../pki
#   GRANT_DELETED=yes     (A;;RPLC;;;svc) on CN=Deleted Objects -> svc sees tombstones with Show Deleted
#   GRANT_GET_CHANGES=yes 'Replicating Directory Changes' on the domain NC -> DirSync flags=0 works for svc
#   LOG_LEVEL=1
set -euo pipefail

REALM=${REALM:-CORP.TEST}
DOMAIN=${DOMAIN:-CORP}
ADMIN_PASS=${ADMIN_PASS:-Passw0rd!Adm1n}
HOSTNAME_DC=${HOSTNAME_DC:-dc}
SVC_NAME=${SVC_NAME:-svc-coexist}
SVC_PASS=${SVC_PASS:-Svc-Passw0rd!}
STRONG_AUTH=${STRONG_AUTH:-no}
TLS=${TLS:-files}
GRANT_DELETED=${GRANT_DELETED:-yes}
GRANT_GET_CHANGES=${GRANT_GET_CHANGES:-yes}
LOG_LEVEL=${LOG_LEVEL:-1}

realm_lc=$(echo "$REALM" | tr 'A-Z' 'a-z')
BASE=$(echo "$realm_lc" | sed 's/^/DC=/; s/\./,DC=/g')      # CORP.TEST -> DC=corp,DC=test
SCHEMA="CN=Schema,CN=Configuration,$BASE"
PY=/usr/bin/python3                                            # samba bindings live in the system python

abspath() { mkdir -p "$1"; (cd "$1" && pwd); }

step_provision() {
  local T; T=$(abspath "$1")
  [ -e "$T/private/sam.ldb" ] && { echo "already provisioned: $T" >&2; return 1; }
  samba-tool domain provision --targetdir="$T" --realm="$REALM" --domain="$DOMAIN" \
    --server-role=dc --dns-backend=NONE --use-rfc2307 --host-name="$HOSTNAME_DC" \
    --adminpass="$ADMIN_PASS" --option="server services=ldap" >"$T/provision.log" 2>&1 \
    || { tail -20 "$T/provision.log" >&2; return 1; }
  mkdir -p "$T/private/tls"          # needed only for TLS=auto (Samba writes its self-signed cert here)
}

step_conf() {
  local T IP TLSD; T=$(abspath "$1"); IP=$2
  TLSD=${TLS_DIR:-$(dirname "$T")/pki}
  mkdir -p "$T/etc" "$T/run" "$T/log" "$T/cache"
  {
    cat <<EOF
[global]
	netbios name = $(echo "$HOSTNAME_DC" | tr 'a-z' 'A-Z')
	realm = $REALM
	workgroup = $DOMAIN
	server role = active directory domain controller
	server services = ldap
	interfaces = $IP/8
	bind interfaces only = yes
	ldap server require strong auth = $STRONG_AUTH
	private dir = $T/private
	lock directory = $T
	state directory = $T/state
	cache directory = $T/cache
	binddns dir = $T/bind-dns
	pid directory = $T/run
	ncalrpc dir = $T/run/ncalrpc
	winbindd socket directory = $T/run/winbindd
	ntp signd socket directory = $T/run/ntp_signd
	log file = $T/log/samba.log
	log level = $LOG_LEVEL
	idmap_ldb:use rfc2307 = yes
EOF
    case "$TLS" in
      none)  echo "	tls enabled = no" ;;
      auto)  echo "	tls enabled = yes" ;;
      files) printf '\ttls enabled = yes\n\ttls keyfile = %s/dc.key\n\ttls certfile = %s/dc.pem\n\ttls cafile = %s/ca.pem\n' "$TLSD" "$TLSD" "$TLSD" ;;
      *) echo "bad TLS=$TLS" >&2; return 1 ;;
    esac
    cat <<EOF

[sysvol]
	path = $T/state/sysvol
	read only = No

[netlogon]
	path = $T/state/sysvol/$realm_lc/scripts
	read only = No
EOF
  } >"$T/etc/smb.conf"
}

step_schema() {
  local T=$1 OPT=(--option="dsdb:schema update allowed=true")
  # 1) the attributes (Samba 4.17 base schema has proxyAddresses but neither of these)
  ldbmodify -H "$T/private/sam.ldb" "${OPT[@]}" >/dev/null <<EOF
dn: CN=ms-Exch-Target-Address,$SCHEMA
changetype: add
objectClass: top
objectClass: attributeSchema
cn: ms-Exch-Target-Address
lDAPDisplayName: targetAddress
attributeID: 1.2.840.113556.1.2.352
attributeSyntax: 2.5.5.12
oMSyntax: 64
isSingleValued: TRUE
rangeLower: 1
rangeUpper: 1123
searchFlags: 1
adminDisplayName: ms-Exch-Target-Address

dn: CN=ms-Exch-Recipient-Type-Details,$SCHEMA
changetype: add
objectClass: top
objectClass: attributeSchema
cn: ms-Exch-Recipient-Type-Details
lDAPDisplayName: msExchRecipientTypeDetails
attributeID: 1.2.840.113556.1.4.7000.102.50855
attributeSyntax: 2.5.5.16
oMSyntax: 65
isSingleValued: TRUE
searchFlags: 1
adminDisplayName: ms-Exch-Recipient-Type-Details
EOF
  # 2) class change in a SEPARATE ldbmodify run (the schema is reloaded when sam.ldb is reopened;
  #    schemaUpdateNow inside the same offline run does not help)
  ldbmodify -H "$T/private/sam.ldb" "${OPT[@]}" >/dev/null <<EOF
dn: CN=Mail-Recipient,$SCHEMA
changetype: modify
add: mayContain
mayContain: targetAddress
mayContain: msExchRecipientTypeDetails
EOF
}

utf16pw() { printf '"%s"' "$1" | iconv -f utf-8 -t utf-16le | base64 -w0; }

# (A;;RPLC;;;<trustee SID>) on CN=Deleted Objects -> trustee can list/read tombstones (Show Deleted, DirSync).
# That container is O:SY and gives Administrators only RPLC (no RC/WD): over normal LDAP even
# Administrator gets 50 "has no write dacl access". Works offline (URL = DIR/private/sam.ldb) or online
# through Samba's privileged socket (URL = ldapi://<DIR>/private/ldap_priv/ldapi, %2F-escaped), where an
# anonymous connection runs as SYSTEM.
grant_deleted() {
  local URL=$1 DN=$2
  "$PY" - "$URL" "$BASE" "$DN" <<'PYEOF'
import sys, ldb
from samba.samdb import SamDB
from samba.auth import system_session
from samba.param import LoadParm
from samba.ndr import ndr_unpack, ndr_pack
from samba.dcerpc import security
url, base, trustee = sys.argv[1:4]
db = SamDB(url=url, session_info=system_session(), lp=LoadParm())
sid = ndr_unpack(security.dom_sid, db.search(base=trustee, scope=ldb.SCOPE_BASE, attrs=["objectSid"])[0]["objectSid"][0])
dn = "CN=Deleted Objects," + base
ctl = ["show_deleted:1", "sd_flags:1:15"]
sd = ndr_unpack(security.descriptor, db.search(base=dn, scope=ldb.SCOPE_BASE, attrs=["nTSecurityDescriptor"], controls=ctl)[0]["nTSecurityDescriptor"][0])
ace = security.ace()
ace.type = security.SEC_ACE_TYPE_ACCESS_ALLOWED
ace.access_mask = security.SEC_ADS_LIST | security.SEC_ADS_READ_PROP      # "RPLC"
ace.trustee = sid
sd.dacl_add(ace)
m = ldb.Message(ldb.Dn(db, dn))
m["nTSecurityDescriptor"] = ldb.MessageElement(ndr_pack(sd), ldb.FLAG_MOD_REPLACE, "nTSecurityDescriptor")
db.modify(m, controls=["show_deleted:1", "sd_flags:1:4"])
PYEOF
}

step_grant_deleted() {   # DIR [online]
  local T; T=$(abspath "$1")
  if [ "${2:-}" = online ]; then
    grant_deleted "ldapi://$(printf %s "$T/private/ldap_priv/ldapi" | sed 's#/#%2F#g')" "CN=$SVC_NAME,CN=Users,$BASE"
  else
    grant_deleted "$T/private/sam.ldb" "CN=$SVC_NAME,CN=Users,$BASE"
  fi
}

step_svc() {
  local T=$1 DN="CN=$SVC_NAME,CN=Users,$BASE"
  ldbadd -H "$T/private/sam.ldb" >/dev/null <<EOF
dn: $DN
objectClass: user
sAMAccountName: $SVC_NAME
userPrincipalName: $SVC_NAME@$realm_lc
userAccountControl: 66048
unicodePwd:: $(utf16pw "$SVC_PASS")
EOF
  if [ "$GRANT_GET_CHANGES" = yes ]; then
    samba-tool dsacl set -H "$T/private/sam.ldb" --car=get-changes --action=allow \
      --objectdn="$BASE" --trusteedn="$DN" >/dev/null
  fi
  if [ "$GRANT_DELETED" = yes ]; then
    grant_deleted "$T/private/sam.ldb" "$DN"
  fi
}

step_lockout() {
  local T=$1 THR=$2 SECS=$3 NS
  NS=$(( -SECS * 10000000 ))    # AD intervals: negative 100 ns units
  ldbmodify -H "$T/private/sam.ldb" >/dev/null <<EOF
dn: $BASE
changetype: modify
replace: lockoutThreshold
lockoutThreshold: $THR
-
replace: lockoutDuration
lockoutDuration: $NS
-
replace: lockOutObservationWindow
lockOutObservationWindow: $NS
-
EOF
}

step_users() {
  local T=$1 N=$2 FIRST=${3:-1}
  awk -v n="$N" -v f="$FIRST" -v base="$BASE" -v dom="$realm_lc" 'BEGIN {
    for (i = f; i < f + n; i++) {
      u = sprintf("user%04d", i)
      printf "dn: CN=%s,CN=Users,%s\nobjectClass: user\nsAMAccountName: %s\nuserPrincipalName: %s@%s\nmail: %s@%s\n", u, base, u, u, dom, u, dom
      printf "proxyAddresses: SMTP:%s@%s\nproxyAddresses: smtp:%s@trust.test\n", u, dom, u
      if (i % 2) printf "msExchRecipientTypeDetails: 2147483648\ntargetAddress: SMTP:%s@tenant.mail.onmicrosoft.com\n", u
      else       printf "msExchRecipientTypeDetails: 1\n"
      printf "\n"
    } }' | ldbadd -H "$T/private/sam.ldb" >/dev/null
}

step_clone() {
  local SRC=$1 T=$2 IP=$3
  [ -e "$T" ] && { echo "exists: $T" >&2; return 1; }
  cp -a "$SRC" "$T"
  rm -rf "$T/run" "$T/log" "$T/msg.sock" "$T/msg.lock"
  step_conf "$T" "$IP"
}

step_new_invocation_id() {
  local T=$1 ID=${2:-$(cat /proc/sys/kernel/random/uuid)} DS GOT
  # ldbsearch folds long LDIF lines (continuation lines start with one space) -> unfold first
  DS=$(ldbsearch -H "$T/private/sam.ldb" -b '' -s base dsServiceName | sed -e ':a;N;$!ba;s/\n //g' | sed -n 's/^dsServiceName: //p')
  ldbmodify -H "$T/private/sam.ldb" >/dev/null <<EOF
dn: $DS
changetype: modify
replace: invocationId
invocationId: $ID
-
EOF
  # ldbmodify may exit 0 on an unparsable LDIF: verify
  GOT=$(ldbsearch -H "$T/private/sam.ldb" -b "$DS" -s base invocationId | sed -n 's/^invocationId: //p')
  [ "$GOT" = "$ID" ] || { echo "invocationId not changed (got '$GOT')" >&2; return 1; }
  echo "$ID"
}

step_pki() {
  local D IP=${2:-127.0.0.3} NAME=${3:-$HOSTNAME_DC.$realm_lc}; D=$(abspath "$1")
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$D/ca.key" -out "$D/ca.pem" \
    -days 3650 -subj "/CN=coexist test CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$D/dc.key" -out "$D/dc.csr" \
    -subj "/CN=$NAME" 2>/dev/null
  openssl x509 -req -in "$D/dc.csr" -CA "$D/ca.pem" -CAkey "$D/ca.key" -CAcreateserial -out "$D/dc.pem" -days 3650 \
    -extfile <(printf 'subjectAltName=IP:%s,DNS:%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$IP" "$NAME") 2>/dev/null
  chown root:root "$D/dc.key"; chmod 0600 "$D/dc.key"   # Samba refuses anything but owner=euid, mode exactly 0600
}

step_template() {
  local T=$1
  step_provision "$T"
  step_conf "$T" 127.0.0.3
  step_schema "$T"
  step_svc "$T"
  step_lockout "$T" 5 60
}

step_run() {
  local T; T=$(abspath "$1")
  # -i: foreground, log to stdout, and exit when stdin reaches EOF (only if stdin is a pipe/tty,
  #     /dev/null is ignored) -> the harness keeps a pipe open; if the test process dies, samba dies.
  # --no-process-group: otherwise -i puts samba in its own process group (killpg of the harness would miss it).
  # -M single: one process, nothing left behind. SIGTERM -> exits immediately (status 127 in 4.17).
  exec samba -i --no-process-group -M single -s "$T/etc/smb.conf"
}

step_wait() {
  local IP=$1 SECS=${2:-20} i
  for ((i = 0; i < SECS * 50; i++)); do
    ldapsearch -x -H "ldap://$IP" -s base -b '' '(objectClass=*)' dsServiceName >/dev/null 2>&1 && return 0
    sleep 0.02
  done
  return 1
}

cmd=${1:-}; shift || true
case "$cmd" in
  template|provision|conf|schema|svc|lockout|users|clone|pki|run|wait) "step_$cmd" "$@" ;;
  grant-deleted) step_grant_deleted "$@" ;;
  new-invocation-id) step_new_invocation_id "$@" ;;
  *) sed -n '2,40p' "$0"; exit 2 ;;
esac
