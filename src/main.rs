//! The `disklet` command line: parses arguments and wires adapters; all logic
//! lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use disklet::config::{Config, EXIT_CONFIG};
use disklet::host::{BlkidProber, ProcTables, SysfsDevices};
use disklet::plan::Classes;

#[derive(Parser)]
#[command(
    name = "disklet",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DISKLET_COMMIT"), ")"),
    about = "Turns dedicated local disks into Kubernetes Local PersistentVolumes"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// List every block device on this node with what disklet would do with it.
    /// Read-only: probes contents and tries an exclusive open, changes nothing.
    Scan {
        /// Config file; without one every device shows as no-class-matches.
        #[arg(long, env = "DISKLET_CONFIG")]
        config: Option<PathBuf>,
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check this node's environment and the API permissions; says what is
    /// wrong and how to fix it. Exit 1 when a check fails.
    Doctor {
        #[arg(long, env = "DISKLET_CONFIG")]
        config: Option<PathBuf>,
        /// Also check that this Node exists.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Skip the API checks (no cluster at hand).
        #[arg(long)]
        no_api: bool,
    },
    /// Run the agent: format eligible disks, mount them, publish Local PVs.
    /// Kubeconfig from the standard places (in-cluster, KUBECONFIG, ~/.kube/config).
    Run {
        #[arg(long, env = "DISKLET_CONFIG")]
        config: PathBuf,
        /// This node's name (spec.nodeName in the DaemonSet).
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// Address for /metrics, /healthz and /readyz.
        #[arg(long, default_value = "0.0.0.0:9403")]
        listen: std::net::SocketAddr,
    },
    /// Serve the CSI driver (Identity, Controller, Node) for the volumes of
    /// this node's pools (classes of kind: pool, which `disklet run` formats
    /// and mounts).
    Csi {
        /// The socket the CSI sidecars and kubelet call.
        #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
        endpoint: String,
        #[arg(long, env = "DISKLET_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        /// The driver's name: the CSIDriver object's and the StorageClass's
        /// provisioner.
        #[arg(long, default_value = disklet::csi::DEFAULT_DRIVER_NAME)]
        driver_name: String,
        /// Volumes this node may hold (NodeGetInfo); each is a loop device.
        #[arg(long, default_value_t = 1000)]
        max_volumes: i64,
        /// Do not read the Node's labels for the topology (no cluster, as
        /// under csi-sanity): the hostname segment is the node name.
        #[arg(long)]
        no_api: bool,
        /// Grow volumes in ControllerExpandVolume too. Off by default: the
        /// DaemonSet runs a csi-resizer on every node, and those cannot tell
        /// whose volume a claim is, so the volume grows in NodeExpandVolume on
        /// its own node (README, CSI volumes).
        #[arg(long)]
        controller_expansion: bool,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(Config::default()),
        Some(p) => Config::load(p).map_err(|e| {
            eprintln!("disklet: {e}");
            ExitCode::from(EXIT_CONFIG as u8)
        }),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Scan { config, output } => {
            let cfg = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match run_scan(&cfg, output) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("disklet scan: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Doctor {
            config,
            node_name,
            no_api,
        } => {
            let cfg = match load_config(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            run_doctor(&cfg, node_name.as_deref(), no_api)
        }
        Command::Run {
            config,
            node_name,
            listen,
        } => {
            let cfg = match load_config(Some(&config)) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if cfg.classes.is_empty() {
                eprintln!(
                    "disklet: {}: classes: none configured, so the agent would do nothing; add a class naming the disks (selector) or discovery dirs disklet may use (`disklet scan` lists candidates)",
                    config.display()
                );
                return ExitCode::from(EXIT_CONFIG as u8);
            }
            match run_agent(cfg, node_name, listen) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("disklet run: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Csi {
            endpoint,
            config,
            node_name,
            driver_name,
            max_volumes,
            no_api,
            controller_expansion,
        } => csi_main(
            &config,
            CsiArgs {
                endpoint,
                node_name,
                driver_name,
                max_volumes,
                no_api,
                expansion: if controller_expansion {
                    disklet::csi::Expansion::Controller
                } else {
                    disklet::csi::Expansion::Node
                },
            },
        ),
    }
}

/// `disklet csi`'s arguments after the config.
struct CsiArgs {
    endpoint: String,
    node_name: String,
    driver_name: String,
    max_volumes: i64,
    no_api: bool,
    expansion: disklet::csi::Expansion,
}

/// `disklet csi`: the config must name a pool, the endpoint be a socket.
fn csi_main(config: &PathBuf, args: CsiArgs) -> ExitCode {
    let cfg = match load_config(Some(config)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if !cfg.classes.iter().any(|c| c.is_pool()) {
        eprintln!(
            "disklet: {}: classes: no class of kind: pool, so the CSI driver would have no pool to carve volumes from; add one (README, CSI)",
            config.display()
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    if let Err(e) = disklet::csi::socket_path(&args.endpoint) {
        eprintln!("disklet: --endpoint: {e}");
        return ExitCode::from(EXIT_CONFIG as u8);
    }
    match run_csi(cfg, args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("disklet csi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_csi(cfg: Config, args: CsiArgs) -> anyhow::Result<()> {
    let CsiArgs {
        endpoint,
        node_name,
        driver_name,
        max_volumes,
        no_api,
        expansion,
    } = args;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut topology = std::collections::BTreeMap::new();
        topology.insert(
            disklet::model::HOSTNAME_LABEL.to_string(),
            node_name.clone(),
        );
        if !no_api {
            let kube = disklet::k8s::client::Kube::connect(&node_name).await?;
            let (info, _) = kube.node_info().await?;
            topology.insert(
                disklet::model::HOSTNAME_LABEL.to_string(),
                info.hostname.clone(),
            );
            for k in &cfg.topology_keys {
                if let Some(v) = info.labels.get(k) {
                    topology.insert(k.clone(), v.clone());
                }
            }
        }
        let node = disklet::csi::NodeFacts {
            name: node_name,
            topology,
            max_volumes,
        };
        let driver = disklet::csi::Driver::new(driver_name, cfg, node, expansion);
        disklet::csi::serve(driver, &endpoint, shutdown_signal()).await?;
        tracing::info!(
            "CSI driver stopped; volumes stay attached and mounted for the pods using them"
        );
        Ok(())
    })
}

fn run_doctor(cfg: &Config, node: Option<&str>, no_api: bool) -> ExitCode {
    use disklet::doctor::{self, Level};
    let mut checks = doctor::node(&disklet::host::system::SystemProbe::default().node());
    checks.extend(doctor::tools());
    checks.extend(doctor::host(cfg, &disklet::host::udevdb::UdevDb::default()));
    if !no_api {
        let api = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| {
                rt.block_on(async {
                    match kube::Client::try_default().await {
                        Ok(client) => doctor::api(client, node).await,
                        Err(e) => vec![doctor::Check {
                            level: Level::Warn,
                            name: "API server".into(),
                            detail: format!("no kubeconfig: {e}"),
                            fix: "set KUBECONFIG to check the API and RBAC, or pass --no-api"
                                .into(),
                        }],
                    }
                })
            });
        match api {
            Ok(c) => checks.extend(c),
            Err(e) => eprintln!("disklet doctor: {e}"),
        }
    }
    print!("{}", doctor::render(&checks));
    if checks.iter().any(|c| c.level == Level::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run_agent(cfg: Config, node_name: String, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let classes = Classes::compile(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let kube = disklet::k8s::client::Kube::connect(&node_name).await?;
        let agent = disklet::reconcile::Agent::new(
            cfg,
            classes,
            kube,
            Box::new(disklet::host::format::MkfsFormatter::default()),
            Box::new(disklet::host::mounter::SysMounter),
        );
        let addr = disklet::server::serve(listen, agent.metrics.clone(), agent.status.clone()).await?;
        tracing::info!(node = node_name, %addr, "disklet agent starting; serving /metrics, /healthz, /readyz");
        agent.run(shutdown_signal()).await?;
        tracing::info!("disklet agent stopped; mounts are left in place for the pods using them");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn run_scan(cfg: &Config, output: Output) -> anyhow::Result<()> {
    let classes = Classes::compile(cfg)?;
    let tables = ProcTables::new(&cfg.mount_info);
    let rows = disklet::scan::scan(
        cfg,
        &classes,
        &SysfsDevices::default(),
        &BlkidProber::default(),
        &tables,
    )?;
    let text = match output {
        Output::Table => disklet::scan::render_table(&rows),
        Output::Json => serde_json::to_string_pretty(&rows)? + "\n",
        Output::Yaml => serde_saphyr::to_string(&rows)?,
    };
    print!("{text}");
    Ok(())
}
