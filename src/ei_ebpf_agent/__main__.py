from ei_ebpf_agent.cli import main

raise SystemExit(main())
