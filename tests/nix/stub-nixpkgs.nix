# A stand-in for nixpkgs with exactly the attributes flake.nix uses, for evaluating the
# flake offline (tests/unit/test_flake.py). Every package is a fake derivation named after
# its nixpkgs attribute; the builders return their arguments so the test can inspect them.
# Each attribute here exists under the same name in nixpkgs 24.11.
let
  drv = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000-stub-${name}"; };
  systems = [ "x86_64-linux" "aarch64-linux" ];
  genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
  python3Packages = genAttrs [
    "numpy" "grpcio" "protobuf" "pyroute2" "prometheus-client"
    "pytest" "grpcio-tools" "nox" "hatchling"
  ] drv // {
    buildPythonApplication = args: args // drv "${args.pname}-${args.version}";
  };
  pkgs = genAttrs [ "bpftools" "ruff" "libbpf" "linuxHeaders" ] drv // {
    inherit python3Packages;
    python3 = drv "python3" // {
      withPackages = f: drv "python3-env" // { packages = f python3Packages; };
    };
    llvmPackages_19 = genAttrs [ "clang" "llvm" "clang-tools" ] (n: drv "${n}-19");
    mkShell = args: args // drv "nix-shell";
  };
in
{
  lib = {
    inherit genAttrs;
    makeLibraryPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/lib") ps);
    licenses.asl20 = { spdxId = "Apache-2.0"; };
    platforms.linux = systems;
  };
  legacyPackages = genAttrs systems (system: pkgs);
}
