"""Reference: Integrated Gradients exactly as TensorFlow's tutorial computes it.

Credit: "Integrated gradients", TensorFlow Core tutorials (Apache 2.0),
https://www.tensorflow.org/tutorials/interpretability/integrated_gradients
(``shared/seeds/integrated-gradients-tutorial.txt``), after Sundararajan, Taly & Yan (2017),
https://arxiv.org/abs/1703.01365.

Kept faithful so the benchmark measures the tutorial, not a tuned variant: ``m_steps + 1``
interpolated images from ``tf.linspace(0, 1, m_steps + 1)``, gradients in batches of
``batch_size`` through one ``@tf.function`` per batch, the trapezoidal Riemann rule, and the
scaling by ``(image - baseline)``, one image and one class per call. The one change: the
tutorial's ImageNet model returns logits and it applies ``tf.nn.softmax``; our exported
``xai_model`` already returns probabilities, so ``model`` here is used as the probability
function directly (applying softmax again would explain a different output).
"""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import tensorflow as tf


def interpolate_images(baseline, image, alphas):
    alphas_x = alphas[:, tf.newaxis, tf.newaxis, tf.newaxis]
    baseline_x = tf.expand_dims(baseline, axis=0)
    input_x = tf.expand_dims(image, axis=0)
    delta = input_x - baseline_x
    images = baseline_x + alphas_x * delta
    return images


def make_integrated_gradients(model):
    """The tutorial's functions bound to ``model`` (images -> probabilities [N, C])."""

    def compute_gradients(images, target_class_idx):
        with tf.GradientTape() as tape:
            tape.watch(images)
            probs = model(images)[:, target_class_idx]
        return tape.gradient(probs, images)

    def integral_approximation(gradients):
        # riemann_trapezoidal
        grads = (gradients[:-1] + gradients[1:]) / tf.constant(2.0)
        integrated_gradients = tf.math.reduce_mean(grads, axis=0)
        return integrated_gradients

    @tf.function
    def one_batch(baseline, image, alpha_batch, target_class_idx):
        # Generate interpolated inputs between baseline and input.
        interpolated_path_input_batch = interpolate_images(baseline=baseline, image=image, alphas=alpha_batch)
        # Compute gradients between model outputs and interpolated inputs.
        gradient_batch = compute_gradients(images=interpolated_path_input_batch,
                                           target_class_idx=target_class_idx)
        return gradient_batch

    def integrated_gradients(baseline, image, target_class_idx, m_steps=50, batch_size=32):
        # Generate alphas.
        alphas = tf.linspace(start=0.0, stop=1.0, num=m_steps + 1)
        # Collect gradients.
        gradient_batches = []
        # Iterate alphas range and batch computation for speed, memory efficiency, and scaling to larger m_steps.
        for alpha in tf.range(0, len(alphas), batch_size):
            from_ = alpha
            to = tf.minimum(from_ + batch_size, len(alphas))
            alpha_batch = alphas[from_:to]
            gradient_batch = one_batch(baseline, image, alpha_batch, target_class_idx)
            gradient_batches.append(gradient_batch)
        # Concatenate path gradients together row-wise into single tensor.
        total_gradients = tf.concat(gradient_batches, axis=0)
        # Integral approximation through averaging gradients.
        avg_gradients = integral_approximation(gradients=total_gradients)
        # Scale integrated gradients with respect to input.
        integrated_gradients = (image - baseline) * avg_gradients
        return integrated_gradients

    return integrated_gradients
