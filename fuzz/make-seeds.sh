#!/usr/bin/env bash
# Write the seed corpora of the repository and API decoder targets (index, manifest, xmlrpc,
# jsonrpc, tar, bitmap) into fuzz/seeds/TARGET/. Index and manifest seeds come from a real
# repository made by the release binary (cargo build --release first); the rest are written
# here from the protocols' shapes. Run from anywhere; rerun after a format change.
set -euo pipefail
cd "$(dirname "$0")"
bin=../target/release/cbtfs
seeds=seeds
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p $seeds/{index,manifest,xmlrpc,jsonrpc,tar,bitmap}

# A repository: a base of 5 blocks (one short last block, two all-zero) and an increment.
vdi=3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b
"$bin" init "$work/r" >/dev/null
python3 - "$work/img" <<'PY'
import sys
b = bytearray(4 * 65536 + 1000)
b[0:10] = b"0123456789"; b[3*65536:3*65536+5] = b"hello"; b[-1] = 7
open(sys.argv[1], "wb").write(b)
PY
"$bin" import "$work/r" --vdi $vdi --raw "$work/img" --time 2026-11-21T02:00:00Z >/dev/null
python3 -c "import base64,sys; open(sys.argv[1],'w').write(base64.b64encode(bytes([0x40])).decode())" "$work/bm"
"$bin" import "$work/r" --vdi $vdi --raw "$work/img" --bitmap "$work/bm" --time 2026-11-22T02:00:00Z >/dev/null
set_dir=$(echo "$work"/r/disks/$vdi/*)
for f in "$set_dir"/*.idx; do cp "$f" "$seeds/index/$(basename "$f" | cut -c1-6).idx"; done
head -c 70 "$set_dir"/000000-*.idx > $seeds/index/truncated.idx
: > $seeds/index/empty.idx
cp "$set_dir/000000.point" $seeds/manifest/base.point
cp "$set_dir/000001.point" $seeds/manifest/incremental.point
python3 - "$set_dir/000000.point" $seeds/manifest <<'PY'
import json, sys
text = open(sys.argv[1]).read()
body = text[:text.rindex("\ncbtfs-crc32c:")]
m = json.loads(body)
out = sys.argv[2]
# JSON only: the target appends a valid checksum itself.
open(out + "/json-only", "w").write(body)
m["vm_metadata"] = {"name": "000000-0123456789abcdef.vm.tar", "len": 10240}
open(out + "/json-vm-metadata", "w").write(json.dumps(m))
m["index"]["name"] = "../../../outside.idx"
open(out + "/json-escape", "w").write(json.dumps(m))
m = json.loads(body); m["virtual_size"] = 1 << 62
open(out + "/json-huge", "w").write(json.dumps(m))
PY

# XML-RPC as xapi answers (untyped strings, 64-bit ints as strings, Status/Value).
x=$seeds/xmlrpc
cat > $x/success-string.xml <<'XML'
<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:0b3c</value></member></struct></value></param></params></methodResponse>
XML
cat > $x/failure.xml <<'XML'
<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>SR_BACKEND_FAILURE_460</value><value></value><value>Source and target VDI are unrelated</value></data></array></value></member></struct></value></param></params></methodResponse>
XML
cat > $x/record.xml <<'XML'
<methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value><struct><member><name>virtual_size</name><value>17179869184</value></member><member><name>cbt_enabled</name><value><boolean>1</boolean></value></member><member><name>other_config</name><value><struct/></value></member><member><name>VBDs</name><value><array><data/></array></value></member><member><name>n</name><value><i4>-7</i4></value></member><member><name>d</name><value><double>1.5</double></value></member><member><name>t</name><value><dateTime.iso8601>20261123T10:00:00Z</dateTime.iso8601></value></member><member><name>e</name><value>a &amp; b &#60; c<![CDATA[<raw>]]></value></member><member><name>z</name><value><nil/></value></member></struct></value></member></struct></value></param></params></methodResponse>
XML
echo '<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1</int></value></member></struct></value></fault></methodResponse>' > $x/fault.xml
echo '<value><array><data><value>OpaqueRef:1</value><value>OpaqueRef:2</value></data></array></value>' > $x/value-fragment.xml
echo '<?xml version="1.0"?><methodCall><methodName>VDI.get_record</methodName><params><param><value>OpaqueRef:s</value></param></params></methodCall>' > $x/call.xml

j=$seeds/jsonrpc
echo '{"jsonrpc":"2.0","result":"OpaqueRef:5e1a","id":1}' > $j/result.json
echo '{"jsonrpc":"2.0","error":{"code":1,"message":"VDI_IN_USE","data":["OpaqueRef:2","data_destroy"]},"id":2}' > $j/error-v2.json
echo '{"result":null,"error":["SESSION_INVALID","OpaqueRef:3"],"id":3}' > $j/error-v1.json
echo '{"jsonrpc":"2.0","result":{"uuid":"3f1c6f5e-9d7b-4a55-b5f4-0c7f8a1d2e3b","virtual_size":"17179869184","type":"user","cbt_enabled":true,"snapshot_time":"20261123T10:00:00Z","VBDs":["OpaqueRef:9"],"other_config":{"k":"v","n":3}},"id":4}' > $j/record.json
echo '{"id":5}' > $j/empty.json
echo '<html>not json</html>' > $j/html

# Tar: what `tar` writes (ustar), and an empty archive.
mkdir -p "$work/t"
echo '<value><struct/></value>' > "$work/t/ova.xml"
head -c 700 /dev/zero | tr '\0' 'x' > "$work/t/disk"
tar --format=ustar -C "$work/t" -cf $seeds/tar/ova.tar ova.xml disk
head -c 1024 /dev/zero > $seeds/tar/empty.tar
head -c 600 $seeds/tar/ova.tar > $seeds/tar/truncated.tar

# Bitmap: 8-byte little-endian block count, then base64 text or raw bytes.
b=$seeds/bitmap
python3 - $b <<'PY'
import base64, struct, sys
d = sys.argv[1]
def w(name, count, body): open(f"{d}/{name}", "wb").write(struct.pack("<Q", count) + body)
w("guide-example", 8, base64.b64encode(bytes([0b01100000])))
w("raw-excess", 10, bytes([0xff, 0xc0, 0x01]))
w("short", 17, base64.b64encode(bytes([0xff, 0xff])))
w("wrapped-lines", 64, base64.encodebytes(bytes(range(8))))
w("huge-count", 1 << 63 | 5, bytes([0x80]))
PY
echo "seeds written:"; for t in index manifest xmlrpc jsonrpc tar bitmap; do echo "  $t: $(ls $seeds/$t | wc -l)"; done
