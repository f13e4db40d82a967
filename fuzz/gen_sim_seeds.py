#!/usr/bin/env python3
"""Write the seed corpora of the simulated host's parsers: `sim_http` (request heads),
`sim_xmlrpc` (XML-RPC calls and values) and `sim_tar` (ustar archives). A few valid inputs
and edge cases each. Run from anywhere: python3 gen_sim_seeds.py
"""
import io
import os
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


http = {
    "jsonrpc": "POST /jsonrpc HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n{}",
    "export": "GET /export_raw_vdi?session_id=OpaqueRef%3Aab&vdi=u&format=raw HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n",
    "import_map": "PUT /import_metadata?session_id=s&task_id=t&vdi%3Aa=b&vdi%3Ac=d HTTP/1.1\r\nContent-Length: 10240\r\nExpect: 100-continue\r\n\r\n",
    "chunked": "PUT /import_raw_vdi?vdi=x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "http10": "\r\n\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "two_lengths": "PUT / HTTP/1.1\r\nContent-Length: 5, 5\r\ncontent-length: 6\r\n\r\n",
    "folded": "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
    "incomplete": "GET /sim/state HTTP/1.1\r\nx-sim-token: t\r\n",
}
for k, v in http.items():
    put("sim_http", k, v)

xml = {
    "call": "<?xml version='1.0'?><methodCall><methodName>VDI.get_record</methodName><params>"
            "<param><value><string>OpaqueRef:1</string></value></param><param><value>OpaqueRef:2</value></param>"
            "</params></methodCall>",
    "types": "<value><struct><member><name>i</name><value><i4>-7</i4></value></member>"
             "<member><name>b</name><value><boolean>1</boolean></value></member>"
             "<member><name>d</name><value><double>1.5</double></value></member>"
             "<member><name>t</name><value><dateTime.iso8601>20261123T10:00:00Z</dateTime.iso8601></value></member>"
             "<member><name>a</name><value><array><data><value>x</value><value><nil/></value></data></array></value></member>"
             "</struct></value>",
    "entities": "<value>&lt;&amp;&#65;&#x42;&quot;&apos;&gt;<![CDATA[<raw>]]></value>",
    "ova": "<value><struct><member><name>objects</name><value><array><data><value><struct>"
           "<member><name>snapshot</name><value><struct><member><name>name_label</name><value>vm1</value>"
           "</member></struct></value></member></struct></value></data></array></value></member></struct></value>",
    "deep": "<value>" + "<array><data><value>" * 70 + "x" + "</value></data></array>" * 70 + "</value>",
    "doctype": "<!DOCTYPE x [<!ENTITY a 'b'>]><value>&a;</value>",
    "empty_params": "<methodCall><methodName>session.logout</methodName><params/></methodCall>",
}
for k, v in xml.items():
    put("sim_xmlrpc", k, v)


def ustar(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


one = ustar([("ova.xml", xml["ova"].encode())])
put("sim_tar", "ova", one)
put("sim_tar", "three", ustar([("a", b""), ("dir/b", bytes(range(256)) * 3), ("c", b"x" * 511)]))
put("sim_tar", "cut", one[:700])
put("sim_tar", "one_end_block", one[:1536])
put("sim_tar", "empty", bytes(1024))
