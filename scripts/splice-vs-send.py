#!/usr/bin/env python3
# Sends a memfd of N GiB (argument 2, default 1) over one loopback TCP
# connection in 256 KiB steps, either with send() from its mapping or
# spliced (memfd -> pipe -> socket), and prints the CPU seconds per GiB each
# side spent (getrusage). docs/benchmarks.md quotes it: why the uring
# transport does not splice guest memory.
#   python3 scripts/splice-vs-send.py send 2
#   python3 scripts/splice-vs-send.py splice 2
import os, socket, sys, mmap, resource, time, fcntl
MODE=sys.argv[1]; GIB=int(sys.argv[2]) if len(sys.argv)>2 else 1
SIZE=GIB<<30; CH=256<<10
fd=os.memfd_create("g"); os.ftruncate(fd,SIZE)
m=mmap.mmap(fd,SIZE)
blk=os.urandom(1<<20)
for o in range(0,SIZE,1<<20): m[o:o+(1<<20)]=blk
ls=socket.socket(); ls.bind(("127.0.0.1",0)); ls.listen(1); port=ls.getsockname()[1]
pid=os.fork()
if pid==0:
    c=ls.accept()[0]
    tfd=os.memfd_create("t"); os.ftruncate(tfd,SIZE); tm=mmap.mmap(tfd,SIZE); mv=memoryview(tm)
    for o in range(0,SIZE,4096): tm[o]=0
    c.sendall(b"r")
    r0=resource.getrusage(resource.RUSAGE_SELF)
    got=0
    while got<SIZE:
        n=c.recv_into(mv[got:min(got+CH,SIZE)])
        if n==0: break
        got+=n
    r1=resource.getrusage(resource.RUSAGE_SELF)
    print("target cpu s/GiB %.3f (u %.3f s %.3f)"%(((r1.ru_utime-r0.ru_utime)+(r1.ru_stime-r0.ru_stime))/GIB,(r1.ru_utime-r0.ru_utime)/GIB,(r1.ru_stime-r0.ru_stime)/GIB)); os._exit(0)
s=socket.create_connection(("127.0.0.1",port)); s.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
s.recv(1)
mv=memoryview(m)
r0=resource.getrusage(resource.RUSAGE_SELF); t0=time.time()
if MODE=="send":
    for o in range(0,SIZE,CH): s.sendall(mv[o:o+CH])
else:
    pr,pw=os.pipe(); fcntl.fcntl(pw,1031,1<<20)
    sfd=s.fileno()
    for o in range(0,SIZE,CH):
        n=os.splice(fd,pw,CH,offset_src=o)
        while n>0:
            n-=os.splice(pr,sfd,n)
r1=resource.getrusage(resource.RUSAGE_SELF); t1=time.time()
os.waitpid(pid,0); t2=time.time()
print("%s source cpu s/GiB %.3f (u %.3f s %.3f) %.0f MiB/s"%(MODE,((r1.ru_utime-r0.ru_utime)+(r1.ru_stime-r0.ru_stime))/GIB,(r1.ru_utime-r0.ru_utime)/GIB,(r1.ru_stime-r0.ru_stime)/GIB, SIZE/(1<<20)/(t2-t0)))
