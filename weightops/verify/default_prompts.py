"""The built-in prompt set of `weightops verify`: about 2,000 LLaMA tokens of short English
and Chinese text and of chat turns in the formats the released Chinese models were tuned on
(LLaMA/Alpaca, Chinese-Alpaca, ChatYuan, YaYi, Huozi, plain BLOOM continuation).

Each prompt carries an answer, so the comparison covers the tokens a model produces after its
chat markers, not only the user's text. Names are what a failed gate reports.
"""

from __future__ import annotations

_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{q}\n\n### Response:\n{a}"
)

PROMPTS: tuple[tuple[str, str], ...] = (
    (
        "en-history",
        (
            "Movable type changed how knowledge travelled. Around 1040, the Chinese artisan Bi Sheng carved single "
            "characters into soft clay, hardened them in a fire and arranged them on an iron plate coated with resin "
            "and wax. When the plate was warmed the type could be pressed into place, and after printing it could be "
            "loosened and used again. Wooden and later metal type followed in China and Korea, and four centuries "
            "later Johannes Gutenberg combined metal type with an oil-based ink and a screw press in Mainz. Within "
            "fifty years printing shops had spread to more than two hundred European cities, and the price of a book "
            "fell so far that students could own the texts they studied."
        ),
    ),
    (
        "en-technical",
        (
            "A model checkpoint is little more than a dictionary of named tensors plus a configuration file that says "
            "how to wire them together. Converting it between formats should therefore be a pure renaming, except "
            "where two frameworks disagree on the layout of a tensor: the query and key projections of a rotary model, "
            "for example, are stored with interleaved pairs in some code bases and with rotated halves in others. A "
            "converter that forgets the permutation still produces a file that loads without complaint, yet the model "
            "answers with fluent nonsense. Comparing the output distributions of the original and the converted model "
            "on a few thousand tokens catches such mistakes in seconds."
        ),
    ),
    (
        "en-story",
        (
            "The lighthouse keeper wrote the same three lines in his log every evening: the wind, the sea, the ships. "
            "On the night of the storm he wrote nothing at all. When the supply boat reached the island two days "
            "later, the crew found the lamp still turning, the kettle cold, and a note pinned to the door that said "
            'only, "Gone to help. Keep the light burning." They kept it burning for eleven nights before he came '
            "back, soaked and smiling, in a fishing boat that nobody on the mainland had ever seen."
        ),
    ),
    (
        "zh-history",
        (
            "活字印刷术是中国古代四大发明之一。北宋庆历年间，平民毕昇用胶泥刻字，每字一印，用火烧硬后排在铁板上，"
            "铁板上预先铺好松脂、蜡和纸灰的混合物。排满一版后，用火烤化药剂，再用平板把字压平，就可以印刷了。"
            "印完以后，再用火把药剂烤化，字就可以拆下来重复使用。沈括在《梦溪笔谈》里详细记载了这种方法。"
            "后来人们又发明了木活字和铜活字，活字印刷逐渐传到朝鲜、日本和欧洲。"
        ),
    ),
    (
        "zh-news",
        (
            "本报讯 记者从市交通管理部门获悉，为缓解早晚高峰拥堵，城市东部新建的两条公交专用道将于下月一日起正式启用。"
            "专用道工作日七时至九时、十七时至十九时仅允许公交车、校车和救护车通行，其他时段向社会车辆开放。"
            "交通部门表示，试运行期间将根据客流和路况数据及时调整线路和发车间隔，并欢迎市民通过热线电话提出意见和建议。"
        ),
    ),
    (
        "zh-poem",
        (
            "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n"
            "这首诗语言朴素，却写出了游子在异乡的深夜里对家乡的思念。诗人先写月光洒在床前，像一层白霜；"
            "然后抬头看见明月，又低下头想起了远方的故乡。短短二十个字，情景交融，千百年来一直被人们传诵。"
        ),
    ),
    (
        "mixed-en-zh",
        (
            "在部署大模型之前，工程师通常会把权重转换成 GGUF 格式，再用 llama.cpp 在 CPU 上推理。"
            "Quantization to Q4_0 cuts the file to about a quarter of its FP16 size, 但是也会带来一定的精度损失。"
            "所以发布之前，最好用 KL divergence 和 top-1 agreement 检查量化模型和原始模型的输出是否足够接近。"
        ),
    ),
    (
        "alpaca-en",
        _ALPACA.format(
            q="Explain in two sentences why the sky looks blue during the day and red at sunset.",
            a="Sunlight is scattered by the molecules of the air, and short blue wavelengths are scattered much more "
            "strongly than long red ones, so blue light reaches our eyes from every part of the sky. At sunset the "
            "light crosses far more air before it arrives, most of the blue is scattered away on the journey, and "
            "the remaining red and orange light colours the horizon.",
        ),
    ),
    (
        "alpaca-zh",
        _ALPACA.format(
            q="请用三句话介绍一下如何保持良好的睡眠习惯。",
            a="首先，每天尽量在固定的时间上床和起床，周末也不要相差太多。其次，睡前一小时少看手机和电脑，"
            "可以读书或听一些轻柔的音乐来放松身心。最后，卧室要保持安静、黑暗和适宜的温度，晚上避免喝咖啡和浓茶。",
        ),
    ),
    (
        "chatyuan",
        (
            "用户：我想周末带孩子去郊外玩，有什么需要准备的吗？\n"
            "小元：带孩子去郊外游玩，可以提前准备这些东西：一是饮用水和简单的食物，比如面包、水果；"
            "二是防晒用品和帽子，还有一件薄外套，防止早晚温差大；三是常用药品和创可贴；四是垃圾袋，"
            "离开时把垃圾带走。出发前最好查一下天气预报，并告诉家人你们的行程。\n"
            "用户：如果下雨怎么办？\n"
            "小元："
        ),
    ),
    (
        "yayi",
        (
            "<|System|>:\nYou are a helpful, respectful and honest assistant. "
            "你是一个乐于助人、尊重他人并且诚实的助手。\n\n"
            "<|Human|>:\n帮我写一段简短的产品介绍，产品是一款可以折叠的电动自行车。\n\n"
            "<|YaYi|>:\n这款折叠电动自行车专为城市通勤设计。车身采用轻量化铝合金，整车重量不到十五公斤，"
            "十秒钟即可完成折叠，方便带上地铁或放进汽车后备箱。满电状态下续航可达六十公里，"
            "配备液压碟刹和防水电池，晴天雨天都能安心出行。"
        ),
    ),
    (
        "huozi",
        (
            "<human>: 什么是机器翻译？请简单说明它的发展历史。\n"
            "<bot>: 机器翻译是指利用计算机把一种自然语言自动翻译成另一种自然语言。"
            "早期的机器翻译主要依靠人工编写的规则和词典；"
            "上世纪九十年代以后，基于统计的方法逐渐成为主流，系统从大量双语语料中学习翻译规律；"
            "近年来，基于神经网络的翻译模型大幅提高了译文的流畅度和准确性。\n"
            "<human>: 那它现在还有哪些不足？\n"
            "<bot>: "
        ),
    ),
    (
        "bloom-plain",
        (
            "def moving_average(values, window):\n"
            '    """Return the mean of every run of `window` consecutive values."""\n'
            "    if window <= 0:\n"
            '        raise ValueError("window must be positive")\n'
            "    total = sum(values[:window])\n"
            "    result = [total / window]\n"
            "    for i in range(window, len(values)):\n"
            "        total += values[i] - values[i - window]\n"
            "        result.append(total / window)\n"
            "    return result\n\n"
            "La bibliothèque municipale ouvre ses portes le samedi matin. Les enfants peuvent y emprunter jusqu'à "
            "cinq livres pour trois semaines."
        ),
    ),
)
