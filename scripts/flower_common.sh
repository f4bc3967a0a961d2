# Shared pieces of the Flower deployment scripts (sourced by scripts/flower_deploy.sh and
# scripts/flower_netns.sh; not run by itself). Needs VENV set by the caller.

# The FAB `flwr run` ships: only this pyproject. dependencies = [] so no run-time install can pull a
# CUDA torch; the app's code is the installed feda2v package.
flower_write_app() {  # DIR
  mkdir -p "$1"
  cat > "$1/pyproject.toml" <<'EOF'
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "feda2v-flower"
version = "0.1.0"
description = "feda2v federation on Flower (code comes from the installed feda2v package)"
license = "MIT"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "feda2v"

[tool.flwr.app.components]
serverapp = "feda2v.pipeline.flower_job:server_app"
clientapp = "feda2v.federation.flower_app:client_app"

[tool.flwr.app.config]
config-json = ""
workdir = ""
EOF
}

# The `flwr` CLI's connection (FLWR_HOME/config.toml): NAME at ADDRESS, TLS with CA_CERT (absent:
# insecure).
flower_write_connection() {  # FLWR_HOME NAME ADDRESS [CA_CERT]
  mkdir -p "$1"
  {
    printf '[superlink]\ndefault = "%s"\n\n[superlink.%s]\naddress = "%s"\n' "$2" "$2" "$3"
    if [[ -n ${4:-} ]]; then printf 'root-certificates = "%s"\ninsecure = false\n' "$4"
    else printf 'insecure = true\n'; fi
  } > "$1/config.toml"
}

# Wait until HOST:PORT accepts a TCP connection (inside network namespace NS when given).
flower_wait_port() {  # HOST PORT LOGDIR [NS]
  local run=(); [[ -n ${4:-} ]] && run=(ip netns exec "$4")
  for _ in $(seq 300); do
    "${run[@]}" bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "flower: nothing listens on $1:$2${4:+ in namespace $4} (see $3)" >&2; return 1
}

# `flwr run` of the feda2v app on connection CONN with a resolved feda2v config; the job (rounds,
# checkpoints, reports) runs inside the ServerApp with WORKDIR as its working directory. `flwr run
# --stream` exits 0 even when the ServerApp failed: the job's own finish line decides. Exit status:
# 0 when the job finished, else 1 with the job's one `feda2v: error:` line on stderr. Prefix the call
# with FLOWER_RUN_PREFIX (e.g. `ip netns exec NS`) to run the CLI elsewhere.
flower_run_job() {  # APP_DIR CONN CONFIG WORKDIR LOG
  local t0 t1 line
  t0=$(date +%s.%N)
  ${FLOWER_RUN_PREFIX:-} flwr run "$1" "$2" --stream \
    --run-config "config-json=\"$3\" workdir=\"$4\"" >"$5" 2>&1 || true
  t1=$(date +%s.%N)
  echo "flower: flwr run took $(python3 -c "print(f'{$t1 - $t0:.1f}')") s (log: $5)"
  if ! grep -q "feda2v: flower deployment run finished" "$5"; then
    line=$(grep -m1 "feda2v: error:" "$5" || true)
    echo "${line:-feda2v: error: the Flower deployment run did not finish; see $5}" >&2
    return 1
  fi
}

# TLS for the SuperLink (a CA, and a server certificate for the given IPs signed by it) and one
# SuperNode key pair per node (EC P-384, OpenSSH format: what `flwr supernode register` and
# `flower-supernode --auth-supernode-private-key` read). Made here with the `cryptography` package
# Flower itself depends on (no openssl/ssh-keygen needed).
flower_make_credentials() {  # DIR NODES IP...
  "$VENV/bin/python" - "$@" <<'EOF'
import datetime, ipaddress, os, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

out, nodes, ips = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
os.makedirs(f"{out}/tls", exist_ok=True); os.makedirs(f"{out}/keys", exist_ok=True)
now = datetime.datetime.now(datetime.timezone.utc)
def name(cn): return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
def pem_key(k): return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
def write(path, data, mode=0o600):
    with open(path, "wb") as f: f.write(data)
    os.chmod(path, mode)
ca_key = ec.generate_private_key(ec.SECP384R1())
ca = (x509.CertificateBuilder().subject_name(name("feda2v test CA")).issuer_name(name("feda2v test CA"))
      .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                   key_encipherment=False, data_encipherment=False, key_agreement=False,
                                   encipher_only=False, decipher_only=False), critical=True)
      .sign(ca_key, hashes.SHA384()))
srv_key = ec.generate_private_key(ec.SECP384R1())
srv = (x509.CertificateBuilder().subject_name(name("feda2v superlink")).issuer_name(ca.subject)
       .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
       .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
       .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")] +
                                                  [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]), critical=False)
       .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
       .sign(ca_key, hashes.SHA384()))
write(f"{out}/tls/ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
write(f"{out}/tls/server.crt", srv.public_bytes(serialization.Encoding.PEM), 0o644)
write(f"{out}/tls/server.key", pem_key(srv_key))
for i in range(nodes):
    k = ec.generate_private_key(ec.SECP384R1())
    write(f"{out}/keys/node{i}", k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
    write(f"{out}/keys/node{i}.pub", k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                serialization.PublicFormat.OpenSSH), 0o644)
EOF
}

# The CPU numerics pins of feda2v's console scripts (feda2v/numerics.py) for every Flower process
# started after this: the ServerApp and ClientApps then compute what `feda2v-train` computes.
flower_pin_numerics() {
  eval "$("$VENV/bin/python" -c 'import shlex
from feda2v.numerics import PINNED_ENV, pinned
print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in PINNED_ENV.items()) if pinned() else "")')"
}
