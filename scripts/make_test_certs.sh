#!/usr/bin/env bash
# A throw-away certificate authority and a coordinator certificate signed by it, for trying a
# cross-silo run (scaling_fl/door.py) with TLS. Not for production: use your organisation's CA.
#   scripts/make_test_certs.sh OUT_DIR [HOST ...]
# writes OUT_DIR/ca.crt (give it to every site: tls_cafile=ca.crt) and OUT_DIR/coordinator.crt +
# OUT_DIR/coordinator.key (the coordinator's tls_certfile / tls_keyfile), valid for the HOSTs
# (names or IP addresses; default: localhost and 127.0.0.1) for 30 days.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 OUT_DIR [HOST ...]" >&2
  exit 2
fi
out=$1
shift
hosts=("$@")
[ ${#hosts[@]} -gt 0 ] || hosts=(localhost 127.0.0.1)
san=()
for host in "${hosts[@]}"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=("IP:$host"); else san+=("DNS:$host"); fi
done
san_list=$(IFS=,; echo "${san[*]}")
mkdir -p "$out"
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=scaling-fl test CA" \
  -keyout "$out/ca.key" -out "$out/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=${hosts[0]}" \
  -keyout "$out/coordinator.key" -out "$out/coordinator.csr" 2>/dev/null
openssl x509 -req -in "$out/coordinator.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days 30 -out "$out/coordinator.crt" \
  -extfile <(printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n' "$san_list") 2>/dev/null
rm -f "$out/coordinator.csr" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/coordinator.crt"
echo "wrote $out/ca.crt (sites: tls_cafile), $out/coordinator.crt and $out/coordinator.key (the coordinator), for ${hosts[*]}"
