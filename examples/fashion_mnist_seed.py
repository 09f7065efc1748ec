"""The original TensorSpark MNIST program, trained on Fashion-MNIST.

Softmax regression with GradientDescentOptimizer(learning_rate), sync_interval=100 and
batch_size=100, as in the seed. Only the import lines differ from the seed:
TF1 code now comes from ``tensorflow.compat.v1`` and the module paths
``tensorspark.core.*`` are kept. The images are read from Debian's
``dataset-fashion-mnist`` idx files with ``sc.binaryFiles``, as the seed read
MNIST from HDFS.

    python examples/fashion_mnist_seed.py --master "local[2]" --partitions 2 --epochs 2

Options beyond the seed: ``--consistency`` and ``--combiner`` pick the
training mode; ``--kill-worker LO,HI`` SIGKILLs one training worker at a
random moment LO..HI seconds into training and ``--zombie-partition P``
turns partition P's first attempt into a fenced zombie (both from
``tensorspark.chaos``; use a master that retries tasks, e.g.
``local[2,4]``); ``--json PATH`` writes the accuracy and the server's
counters.
"""

import argparse
import gzip
import json
import os
import sys
import threading
import time

import numpy as np
import pyspark
import tensorflow.compat.v1 as tf

import tensorspark
import tensorspark.core.spark_session as sps
from tensorspark import chaos

tf.disable_v2_behavior()

DATA_DIR = "/usr/share/datasets/fashion-mnist"
mnist_image_file = DATA_DIR + "/train-images-idx3-ubyte.gz"
mnist_label_file = DATA_DIR + "/train-labels-idx1-ubyte.gz"
mnist_test_image_file = DATA_DIR + "/t10k-images-idx3-ubyte.gz"
mnist_test_label_file = DATA_DIR + "/t10k-labels-idx1-ubyte.gz"


def _read32(data, offset):
    return int(np.frombuffer(data, dtype=">u4", count=1, offset=offset)[0])


def _parse_images(content):
    data = gzip.decompress(content)
    magic = _read32(data, 0)
    if magic != 2051:
        raise ValueError("Invalid magic number %d in MNIST image file" % magic)
    num_images, rows, cols = _read32(data, 4), _read32(data, 8), _read32(data, 12)
    images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(num_images, rows * cols)
    return list(enumerate(images))


def _parse_labels(content):
    data = gzip.decompress(content)
    magic = _read32(data, 0)
    if magic != 2049:
        raise ValueError("Invalid magic number %d in MNIST label file" % magic)
    num_items = _read32(data, 4)
    labels = np.frombuffer(data, dtype=np.uint8, offset=8, count=num_items)
    return list(enumerate(labels))


def extract_images(sc, filepath):
    """(index, uint8 image of 784 pixels) pairs of an idx3 .gz file."""
    return sc.binaryFiles(filepath).flatMap(lambda kv: _parse_images(kv[1]))


def extract_labels(sc, filepath):
    """(index, label) pairs of an idx1 .gz file."""
    return sc.binaryFiles(filepath).flatMap(lambda kv: _parse_labels(kv[1]))


def dense_to_one_hot(label, num_class=10):
    one_hot = np.zeros(num_class, dtype=np.float32)
    one_hot[int(label)] = 1.0
    return one_hot


def flatten_image_label(iterator):
    for _, (image, label) in iterator:
        yield (image.astype(np.float32) / 255.0, dense_to_one_hot(label))


def load_test_set(sc):
    images = dict(extract_images(sc, mnist_test_image_file).collect())
    labels = dict(extract_labels(sc, mnist_test_label_file).collect())
    order = sorted(images)
    test_images = np.stack([images[i] for i in order]).astype(np.float32) / 255.0
    test_labels = np.stack([dense_to_one_hot(labels[i]) for i in order])
    return test_images, test_labels


def train(
    sc=None,
    user=None,
    name="spark_mnist",
    server_host="localhost",
    server_port=10080,
    sync_interval=100,
    batch_size=100,
    num_partition=1,
    num_epoch=1,
    learning_rate=0.5,
    weight_combiner=None,
    consistency="async",
    kill_worker=None,
    zombie_partition=None,
    zombie_after=0.0,
    report=None,
    shuffle="full",
    tls=False,
    ps_shards=0,
    checkpoint_dir=None,
    checkpoint_every_s=30.0,
):
    is_new_sc = False
    if sc is None:
        sc = pyspark.SparkContext(conf=pyspark.SparkConf())
        is_new_sc = True

    image_rdd = extract_images(sc, mnist_image_file)
    label_rdd = extract_labels(sc, mnist_label_file)
    image_label_rdd = (
        image_rdd.join(label_rdd, numPartitions=num_partition)
        .mapPartitions(flatten_image_label)
        .cache()
    )

    x = tf.placeholder(tf.float32, [None, 784])
    W = tf.Variable(tf.zeros([784, 10]))
    b = tf.Variable(tf.zeros([10]))
    y = tf.nn.softmax(tf.matmul(x, W) + b)
    y_ = tf.placeholder(tf.float32, [None, 10])
    cross_entropy = tf.reduce_mean(-tf.reduce_sum(y_ * tf.log(y), reduction_indices=[1]))
    train_step = tf.train.GradientDescentOptimizer(learning_rate).minimize(cross_entropy)
    init = tf.initialize_all_variables()
    sess = tf.Session()
    sess.run(init)

    feed_name_list = [x.name, y_.name]
    param_list = [W, b]

    spark_sess = sps.SparkSession(
        sc,
        sess,
        user=user,
        name=name,
        server_host=server_host,
        server_port=server_port,
        sync_interval=sync_interval,
        batch_size=batch_size,
        tls=tls,
        ps_shards=ps_shards,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every_s=checkpoint_every_s,
    )
    image_label_rdd.count()  # cache the data before any fault is injected
    faults = _start_faults(sc, spark_sess, kill_worker, zombie_partition, zombie_after)
    start_time = time.time()
    reconnects = dropped = 0
    for i in range(num_epoch):
        summary = spark_sess.run(
            train_step,
            feed_rdd=image_label_rdd,
            feed_name_list=feed_name_list,
            param_list=param_list,
            # "full": the original TensorSpark's exact whole-partition shuffle.
            # True streams rows through a bounded shuffle buffer instead; this
            # program's log(softmax) at rate 0.5 is fragile enough that some
            # row orders reach NaN (the task then fails, nothing is pushed,
            # and Spark's retry trains on from the server's model).
            shuffle_within_partition=shuffle,
            weight_combiner=weight_combiner,
            consistency=consistency,
        )
        print(
            "epoch %d: %d steps, %d samples, model version %d, %.1f s"
            % (i + 1, summary.steps, summary.samples, summary.version, summary.seconds)
        )
        reconnects += sum(p.get("shard_reconnects", 0) for p in summary.partitions)
        dropped += sum(p.get("pushes_dropped", 0) for p in summary.partitions)
    end_time = time.time()
    print("training time: %.1f s" % (end_time - start_time))

    correct_prediction = tf.equal(tf.argmax(y, 1), tf.argmax(y_, 1))
    accuracy = tf.reduce_mean(tf.cast(correct_prediction, tf.float32))
    test_images, test_labels = load_test_set(sc)
    test_accuracy = sess.run(accuracy, feed_dict={x: test_images, y_: test_labels})
    print("test accuracy: %.4f" % test_accuracy)

    if report is not None:
        report.update(_faults_report(faults))
        report.update(
            test_accuracy=float(test_accuracy),
            training_seconds=end_time - start_time,
            stats={k: v for k, v in spark_sess.stats().items() if not k.startswith("worker_")},
            tls_fingerprint=spark_sess.server.tls_fingerprint if spark_sess.server else None,
            shard_reconnects=reconnects,
            pushes_dropped=dropped,
        )
    spark_sess.close()
    if is_new_sc:
        sc.stop()
    return test_accuracy


def _start_faults(sc, spark_sess, kill_worker, zombie_partition, zombie_after=0.0):
    """Start the requested fault injections (tensorspark.chaos) in threads."""
    faults = {}
    if kill_worker is not None:
        faults["killer"] = chaos.WorkerKiller(port=spark_sess.server_port, delay_s=kill_worker)
        faults["killer"].start()
    if zombie_partition is not None:
        out = faults["zombie"] = {}

        def zombie():
            try:
                out.update(
                    chaos.make_zombie(
                        sc, spark_sess.server_port, zombie_partition, spark_sess.stats
                    )
                )
            except tensorspark.TensorSparkError as e:
                out["error"] = str(e)

        faults["zombie_thread"] = threading.Thread(target=zombie, daemon=True)
        faults["zombie_thread"].start()
    return faults


def _faults_report(faults):
    out = {}
    if "killer" in faults:
        faults["killer"].stop()
        out["kills"] = [vars(k) for k in faults["killer"].killed]
        out["kill_error"] = faults["killer"].error
    if "zombie_thread" in faults:
        faults["zombie_thread"].join(timeout=5)
        out["zombie"] = faults["zombie"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--master", help="Spark master URL (default: spark-submit's --master, else local[2])"
    )
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sync-interval", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--server-host", default=None, help="PS address for executors (default: the driver's)"
    )
    parser.add_argument("--server-port", type=int, default=0, help="PS port (0: a free one)")
    parser.add_argument(
        "--min-accuracy", type=float, default=0.0, help="exit 1 below this test accuracy"
    )
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--combiner", choices=["mean", "delta"], default="mean")
    parser.add_argument("--consistency", choices=["async", "sync", "ssp"], default="async")
    parser.add_argument(
        "--kill-worker",
        metavar="LO,HI",
        help="SIGKILL one training worker LO..HI seconds (at random) after training starts",
    )
    parser.add_argument(
        "--zombie-partition",
        type=int,
        help="freeze partition P's worker, have Spark retry the task, then let it push (fenced)",
    )
    parser.add_argument(
        "--zombie-after", type=float, default=0.0, help="seconds of training before the zombie"
    )
    parser.add_argument(
        "--tls", action="store_true", help="encrypt the parameter-server traffic (TLS 1.3)"
    )
    parser.add_argument("--json", help="write accuracy, faults and server counters here")
    parser.add_argument(
        "--ps-shards", type=int, default=0, help="parameter-server shards in Spark tasks"
    )
    parser.add_argument("--checkpoint-dir", help="snapshots (with --ps-shards: a lost shard's)")
    parser.add_argument("--checkpoint-every-s", type=float, default=30.0)
    parser.add_argument(
        "--shuffle",
        choices=["full", "buffer"],
        default="full",
        help="full: the whole partition, as the original (default); buffer: a bounded buffer",
    )
    args = parser.parse_args(argv)
    for path in (mnist_image_file, mnist_label_file, mnist_test_image_file, mnist_test_label_file):
        if not os.path.exists(path):
            sys.exit(
                "%s is missing: install Debian package dataset-fashion-mnist (make demo does)"
                % path
            )
    # Spark's Python workers must use this interpreter (it has TensorFlow).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = pyspark.SparkConf().setAppName("tensorspark-fashion-mnist-seed")
    if args.master or not conf.contains("spark.master"):
        conf.setMaster(args.master or "local[2]")
    conf.set("spark.ui.showConsoleProgress", "false")
    if args.zombie_partition is not None:
        # The frozen worker must outlive its killed task until it is let go.
        conf.set("spark.python.task.killTimeout", "120s")
    sc = pyspark.SparkContext(conf=conf)
    sc.setLogLevel("ERROR")
    report = {
        "master": conf.get("spark.master"),
        "combiner": args.combiner,
        "consistency": args.consistency,
    }
    kill = tuple(float(v) for v in args.kill_worker.split(",")) if args.kill_worker else None
    combiner = tensorspark.DeltaCombiner() if args.combiner == "delta" else None
    try:
        acc = train(
            sc=sc,
            user=os.environ.get("USER", "user"),
            name="fashion_mnist_seed",
            server_host=args.server_host,
            server_port=args.server_port,
            sync_interval=args.sync_interval,
            batch_size=args.batch_size,
            num_partition=args.partitions,
            num_epoch=args.epochs,
            learning_rate=args.learning_rate,
            weight_combiner=combiner,
            consistency=args.consistency,
            kill_worker=kill,
            shuffle="full" if args.shuffle == "full" else True,
            zombie_partition=args.zombie_partition,
            zombie_after=args.zombie_after,
            report=report,
            tls=args.tls,
            ps_shards=args.ps_shards,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every_s=args.checkpoint_every_s,
        )
    finally:
        sc.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if acc < args.min_accuracy:
        print("test accuracy %.4f is below the bound %.2f" % (acc, args.min_accuracy))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
