#!/usr/bin/env bash
# Mesh identities for the interop tests and the proxy benchmark, generated with openssl into DIR:
#   ca.pem, ca-key.pem              the mesh CA (EC P-256, CA:TRUE)
#   proxy.pem, proxy-key.pem        spiffe://cluster.local/ns/dpu/sa/proxy   (our proxy)
#   envoy.pem, envoy-key.pem        spiffe://cluster.local/ns/peer/sa/envoy  (the Envoy peer)
#   client.pem, client-key.pem      spiffe://cluster.local/ns/peer/sa/client (curl / openssl as a mesh client)
#   rogue-ca.pem, rogue.pem, rogue-key.pem
#                                   another CA and a client certificate it signed, with the client's SPIFFE ID
# Leaf certificates are X.509 v3, CA:FALSE, EKU serverAuth+clientAuth, one URI SAN, EC P-256 keys (PKCS#8).
#   tests/mesh/certs.sh DIR
set -euo pipefail
dir=${1:?usage: certs.sh DIR}
mkdir -p "$dir"
cd "$dir"

ca() { # name, subject
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1-key.pem" 2>/dev/null
	openssl req -x509 -new -key "$1-key.pem" -subj "$2" -days 2 -sha256 -out "$1.pem" \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" \
		-addext "subjectKeyIdentifier=hash"
}

leaf() { # name, issuer, spiffe id
	local name=$1 issuer=$2 id=$3
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$name-key.pem" 2>/dev/null
	openssl req -new -key "$name-key.pem" -subj "/O=dpu-mesh-test/CN=$name" -out "$name.csr"
	cat >"$name.ext" <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = URI:$id
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
	openssl x509 -req -in "$name.csr" -CA "$issuer.pem" -CAkey "$issuer-key.pem" -CAcreateserial \
		-days 2 -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
	rm -f "$name.csr" "$name.ext"
}

ca ca "/O=dpu-mesh-test/CN=mesh test CA"
ca rogue-ca "/O=elsewhere/CN=another CA"
leaf proxy ca spiffe://cluster.local/ns/dpu/sa/proxy
leaf envoy ca spiffe://cluster.local/ns/peer/sa/envoy
leaf client ca spiffe://cluster.local/ns/peer/sa/client
leaf rogue rogue-ca spiffe://cluster.local/ns/peer/sa/client
rm -f ./*.srl
