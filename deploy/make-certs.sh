#!/bin/sh
# The warehouse's TLS material for the compose stack: a private CA and a server certificate for HOST, so that
# clients check the warehouse with sslmode=verify-full. Run by the stack's init service; an existing CA is kept.
#   make-certs.sh CA_DIR SERVER_DIR CLIENT_DIR HOST [SERVER_UID]
# CA_DIR keeps the CA's key (no other service mounts it), SERVER_DIR the warehouse's key and certificate,
# CLIENT_DIR only the CA's certificate, which is all a client needs.
set -eu
ca_dir=$1
server_dir=$2
client_dir=$3
host=$4
server_uid=${5:-}
mkdir -p "$ca_dir" "$server_dir" "$client_dir"
if [ ! -s "$ca_dir/ca.crt" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 825 -sha256 -subj "/CN=health-ingest warehouse CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$ca_dir/ca.key" -out "$ca_dir/ca.crt" 2>/dev/null
fi
if ! openssl verify -CAfile "$ca_dir/ca.crt" -verify_hostname "$host" "$server_dir/server.crt" >/dev/null 2>&1; then
  openssl req -new -newkey rsa:3072 -nodes -sha256 -subj "/CN=$host" \
    -keyout "$server_dir/server.key" -out "$ca_dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' \
    "$host" > "$ca_dir/server.ext"
  openssl x509 -req -in "$ca_dir/server.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$ca_dir/server.ext" -out "$server_dir/server.crt" 2>/dev/null
  rm -f "$ca_dir/server.csr" "$ca_dir/server.ext"
fi
cp "$ca_dir/ca.crt" "$client_dir/ca.crt"
# PostgreSQL refuses a key that others can read.
chmod 600 "$ca_dir/ca.key" "$server_dir/server.key"
chmod 644 "$ca_dir/ca.crt" "$server_dir/server.crt" "$client_dir/ca.crt"
if [ -n "$server_uid" ]; then
  chown "$server_uid:$server_uid" "$server_dir/server.key" "$server_dir/server.crt"
fi
