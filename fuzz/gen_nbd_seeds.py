# Writes the NBD fuzz seeds (fuzz/seeds/nbd_*): server byte streams built from the NBD
# protocol document's message layouts.
import struct, os
def be(fmt,*a): return struct.pack('>'+fmt,*a)
SIMPLE=0x67446698; STRUCT=0x668e33ef; OPTREP=0x0003e889045565a9
def simple(cookie, data=b'', err=0): return be('IIQ',SIMPLE,err,cookie)+data
def chunk(flags,kind,cookie,payload): return be('IHHQI',STRUCT,flags,kind,cookie,len(payload))+payload
def data_chunk(cookie,off,data,done=1): return chunk(done,1,cookie,be('Q',off)+data)
def hole(cookie,off,n,done=0): return chunk(done,2,cookie,be('QI',off,n))
def status(cookie,ctx,ext,done=1): return chunk(done,5,cookie,be('I',ctx)+b''.join(be('II',l,f) for l,f in ext))
def err_chunk(cookie,e,msg,done=1): return chunk(done,0x8001,cookie,be('IH',e,len(msg))+msg)
def pat(off,n): return bytes(((off+i)*7)&255 for i in range(n))
R1=(1,0,4096); R2=(2,8192,1024); R3=(3,(1<<20)-512,512); ST=4
CTX=9; MODE_S=bytes([1|2|(CTX<<2)])
good_structured = (data_chunk(1,0,pat(0,4096)) + hole(2,8192,512) + data_chunk(2,8192+512,pat(8192+512,512))
    + data_chunk(3,R3[1],pat(R3[1],512)) + status(4,CTX,[(65536,0),(65536,3),((1<<20)-131072,0)]))
seeds = {
 'nbd_reply': {
  'simple_ok': bytes([0]) + simple(1,pat(0,4096)) + simple(2,pat(8192,1024)) + simple(3,pat(R3[1],512)),
  'simple_error': bytes([0]) + simple(1,err=5) + simple(2,pat(8192,1024)) + simple(3,err=22),
  'structured_ok': MODE_S + good_structured,
  'wrapped_offset': MODE_S + data_chunk(1,(1<<64)-100,pat(0,4096)),
  'zero_extent': MODE_S + status(4,CTX,[(0,0)]),
  'status_flood': MODE_S + b''.join(status(4,CTX,[(512,0)]*8,done=0) for _ in range(4)),
  'unknown_cookie': MODE_S + simple(0x99,pat(0,4096)),
  'chunk_after_done': MODE_S + data_chunk(1,0,pat(0,4096)) + chunk(1,0,1,b''),
  'error_chunk': MODE_S + err_chunk(1,5,b'no such block') + err_chunk(2,28,b'x'*300,done=0) + chunk(1,0,2,b''),
  'chunk_too_long': MODE_S + data_chunk(3,R3[1],pat(R3[1],4096)),
  'overlap': MODE_S + data_chunk(1,0,pat(0,2048),done=0) + data_chunk(1,1024,pat(1024,3072)),
 },
}
def optrep(opt,kind,data=b''): return be('QIII',OPTREP,opt,kind,len(data))+data
greet = lambda flags: b'NBDMAGIC'+b'IHAVEOPT'+be('H',flags)
info_export = lambda size: be('HQH',0,size,3)
info_block = be('HIII',3,512,65536,32<<20)
go_ok = optrep(7,3,info_export(1<<20)) + optrep(7,3,info_block) + optrep(7,1)
seeds['nbd_handshake'] = {
 'go_structured': greet(3) + optrep(8,1) + optrep(10,4,be('I',CTX)+b'base:allocation') + optrep(10,1) + go_ok + good_structured,
 'go_plain': greet(3) + optrep(8,0x80000001) + go_ok + simple(1,pat(0,4096)) + simple(2,pat(8192,1024)),
 'export_name': greet(1) + optrep(8,0x80000001) + optrep(7,0x80000001) + be('QH',1<<20,3) + bytes(124) + simple(1,pat(0,4096)),
 'go_without_size': greet(3) + optrep(8,1) + optrep(10,1) + optrep(7,1),
 'tls_required': greet(3) + optrep(8,0x80000005),
 'refused': greet(3) + optrep(8,1) + optrep(10,0x80000001) + optrep(7,0x80000006,b'no such export'),
 'other_context': greet(3) + optrep(8,1) + optrep(10,4,be('I',4)+b'qemu:dirty-bitmap:b') + optrep(10,1) + go_ok + status(4,4,[(1<<20,0)]),
}
seeds['nbd_uri'] = {n: u.encode() for n,u in {
 'tcp': 'nbd://host.example:10810/disk%201',
 'tls': 'nbds://10.0.0.1/%2Fvdi-uuid%3Fsession_id%3DOpaqueRef%3Asecret',
 'ipv6': 'nbd://[::1]:99/x',
 'unix': 'nbd+unix:///e?socket=/tmp/s.sock',
 'tls_unix': 'nbds+unix:///disk?socket=%2Frun%2Fnbd.sock&tls=on',
 'bad_port': 'nbd://h:99999/x',
 'bad_escape': 'nbd://h/%zz%',
 'no_scheme': 'host/disk',
}.items()}
here = os.path.dirname(os.path.abspath(__file__))
for target, d in seeds.items():
    os.makedirs(os.path.join(here, 'seeds', target), exist_ok=True)
    for name, b in d.items():
        open(os.path.join(here, 'seeds', target, name), 'wb').write(b)
